"""Does compiling the frame step pay for a server within its first minute? The engine eager and compiled.

    python benchmarks/bench_compile.py [--rows 4] [--frames 16] [--tiny] [--workdir DIR]

Random weights of CSM-1B's size in bfloat16 (a tiny CSM in float32 with --tiny) and a full-size
Mimi, no watermark, on the CPU, each case in a fresh process:
- eager: an engine of `--rows` rows;
- compiled, cold: the same with `compile=True` and an empty inductor cache (a new machine);
- compiled, warm: again, with the cache the cold run filled (a restart).
For each: how long the engine takes to start (the compiled ones compile every row count's
graphs there), and frames per second with 1 request and with `--rows` requests together
(random weights never sample the end of speech, so each runs `--frames` frames). Then, for a
server that starts and serves at that load: the frames it has made after its first minute,
compiled against eager, and when compiling has paid for itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import TEXT, serve
from bench_generate import random_csm

from csm import Generator, Mimi
from csm.engine import Engine, Request
from csm.model import CSMConfig
from csm.text import load_tokenizer
from csm.threads import run_in_fresh_thread
from tests.factories.csm import tiny_config
from tests.factories.mimi import write_moshi_checkpoint
from tests.factories.tokenizer import write_tiny_tokenizer

MINUTE = 60.0


def measure(args: argparse.Namespace, compile: bool) -> dict[str, float]:
    """One case, in this process: the engine's start-up seconds and its frames per second."""
    config, dtype = (tiny_config(), torch.float32) if args.tiny else (CSMConfig(), torch.bfloat16)
    model = run_in_fresh_thread(random_csm, config, dtype, compile=compile)
    mimi = run_in_fresh_thread(Mimi.from_pretrained, args.workdir / "mimi.safetensors")
    generator = Generator(model, mimi, load_tokenizer(args.workdir / "tokenizer.json"))
    started = time.perf_counter()
    engine = Engine(generator, max_batch=args.rows, max_queue=0)
    result = {"start": time.perf_counter() - started}
    with engine:
        for requests in (1, args.rows):
            batch = [Request(TEXT, i % 2, (), args.frames * 80, seed=i) for i in range(requests)]
            serve(engine, batch)  # the first frames of a new shape set up kernels: not timed
            wall, _ = serve(engine, batch)
            result[f"rate {requests}"] = requests * args.frames / wall
    return result


def run_case(args: argparse.Namespace, compile: bool, cache: Path) -> dict[str, float]:
    """`measure` in a fresh process whose inductor cache is `cache`."""
    command = [sys.executable, __file__, "--case", "compiled" if compile else "eager", *sys.argv[1:]]
    environment = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    output = subprocess.run(command, env=environment, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def frames_in_first_minute(case: dict[str, float], requests: int) -> float:
    """Frames made in the first minute after the process starts its engine, at this load."""
    return max(MINUTE - case["start"], 0.0) * case[f"rate {requests}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4, help="the engine's rows (max_batch), also the larger load")
    parser.add_argument("--frames", type=int, default=16, help="frames per request (80 ms each)")
    parser.add_argument("--tiny", action="store_true", help="a tiny CSM in float32 instead of CSM-1B's size in bf16")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/csm-bench-compile"))
    parser.add_argument("--case", choices=("eager", "compiled"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(args, args.case == "compiled")))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    if not (args.workdir / "mimi.safetensors").is_file():
        write_moshi_checkpoint(args.workdir / "mimi.safetensors")
    write_tiny_tokenizer(args.workdir / "tokenizer.json")
    with tempfile.TemporaryDirectory(prefix="inductor-", dir=args.workdir) as cache:
        cases = {
            "eager": run_case(args, False, Path(cache)),
            "compiled, cold cache": run_case(args, True, Path(cache)),
            "compiled, warm cache": run_case(args, True, Path(cache)),
        }
    size = "tiny CSM, fp32" if args.tiny else "CSM-1B size, bf16"
    print(f"random weights ({size}), Mimi full size, {torch.get_num_threads()} threads, engine of {args.rows} rows")
    loads = (1, args.rows)
    header = f"{'case':<22} {'start s':>8}" + "".join(f" {f'frames/s x{n}':>13}" for n in loads)
    header += "".join(f" {f'1st min x{n}':>12}" for n in loads)
    print(header)
    eager = cases["eager"]
    for name, case in cases.items():
        line = f"{name:<22} {case['start']:>8.1f}" + "".join(f" {case[f'rate {n}']:>13.2f}" for n in loads)
        line += "".join(
            f" {frames_in_first_minute(case, n) / frames_in_first_minute(eager, n):>11.2f}x" for n in loads
        )
        print(line)
    for name in ("compiled, cold cache", "compiled, warm cache"):
        case = cases[name]
        for n in loads:
            gained = case[f"rate {n}"] - eager[f"rate {n}"]
            lost = (case["start"] - eager["start"]) * eager[f"rate {n}"]  # frames eager made meanwhile
            when = f"after {lost / gained:.0f} s of serving" if gained > 0 else "never (no faster)"
            print(f"{name}, {n} request(s): pays for its compilation {when}")


if __name__ == "__main__":
    main()
