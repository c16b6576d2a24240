"""Mimi speed: ours against transformers `MimiModel` and (if installed) moshi, same weights.

    python benchmarks/bench_mimi.py [--seconds 10] [--frames 25] [--threads N] [--moshi DIR] [--clock cpu]

Writes random full-size weights (moshi and transformers layouts, identical values) to a
temporary folder, then times encoding and decoding `--seconds` of audio with every
implementation (best of 3 after a warm-up), and streaming decode one frame at a time (best of
3 passes of the mean over the frames). moshi is optional: the installed one (the tests pin
0.2.2), or with `--moshi DIR` another release installed there, e.g.
`pip install --no-deps --target DIR moshi`. The output names the moshi version it compared.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_TORCH_COMPILE", "1")  # moshi reads it at import

from csm.mimi import Mimi
from tests.factories.mimi import write_moshi_checkpoint, write_transformers_checkpoint

# Wall time by default; `--clock cpu` (one thread) counts only this thread's CPU time, which
# other processes on a shared machine barely disturb.
clock = time.perf_counter


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def per_frame_latency(step: Callable[[torch.Tensor], object], codes: torch.Tensor) -> float:
    """Mean seconds per `step(frame)` over the frames of `codes` (after one warm-up frame)."""
    step(codes[..., :1])
    start = clock()
    for t in range(1, codes.shape[-1]):
        step(codes[..., t : t + 1])
    return (clock() - start) / (codes.shape[-1] - 1)


def best_stream_latency(
    step: Callable[[torch.Tensor], object], reset: Callable[[], object], codes: torch.Tensor
) -> float:
    """Best of 3 streams of `codes` (each from a fresh state) of the mean seconds per frame."""
    latencies = []
    for _ in range(3):
        reset()
        latencies.append(per_frame_latency(step, codes))
    return min(latencies)


def load_implementations(folder: Path) -> dict[str, tuple[Callable, Callable, Callable]]:
    """name -> (encode(wav), decode(codes), streaming decode latency(codes))."""
    moshi_file = write_moshi_checkpoint(folder, seed=0)
    write_transformers_checkpoint(folder / "transformers", seed=0)
    ours = Mimi.from_pretrained(moshi_file)

    def ours_stream(codes):
        stream = ours.decode_stream(codes.shape[0])
        return best_stream_latency(stream.step, stream.reset, codes)

    implementations = {"csm.mimi": (ours.encode, ours.decode, ours_stream)}

    from transformers import MimiModel

    reference = MimiModel.from_pretrained(folder / "transformers").eval()

    def hf_encode(wav):
        with torch.inference_mode():
            return reference.encode(wav).audio_codes

    def hf_decode(codes):
        with torch.inference_mode():
            return reference.decode(codes).audio_values

    implementations["transformers"] = (hf_encode, hf_decode, None)
    try:
        import moshi as moshi_package
        from moshi.models.loaders import get_mimi
    except ImportError:
        print("moshi not installed: comparing with transformers only")
        return implementations
    # moshi 0.2.2 imports bitsandbytes in every linear layer but only uses it for int8 weights.
    sys.modules.setdefault("bitsandbytes", ModuleType("bitsandbytes"))
    moshi = get_mimi(moshi_file, num_codebooks=32).eval()

    def moshi_encode(wav):
        with torch.inference_mode():
            return moshi.encode(wav)

    def moshi_decode(codes):
        with torch.inference_mode():
            return moshi.decode(codes)

    def moshi_stream(codes):
        with torch.inference_mode(), moshi.streaming(codes.shape[0]):
            return best_stream_latency(moshi.decode, moshi.reset_streaming, codes)

    implementations[f"moshi {moshi_package.__version__}"] = (moshi_encode, moshi_decode, moshi_stream)
    return implementations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--frames", type=int, default=25, help="frames for the streaming latency")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--moshi", type=Path, help="compare the moshi installed in this folder (pip --target)")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="cpu: this thread's CPU time (needs --threads 1)"
    )
    args = parser.parse_args()
    if args.clock == "cpu":
        if args.threads != 1:
            parser.error("--clock cpu counts one thread's time: use it with --threads 1")
        global clock
        clock = time.thread_time
    if args.moshi is not None:
        if not (args.moshi / "moshi").is_dir():
            parser.error(f"{args.moshi} holds no moshi package (pip install --no-deps --target {args.moshi} moshi)")
        sys.path.insert(0, str(args.moshi))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    wav = 0.1 * torch.randn(1, 1, int(args.seconds * 24000))
    codes = torch.randint(0, 2048, (1, 32, int(args.seconds * 12.5)))
    stream_codes = codes[..., : args.frames]

    with tempfile.TemporaryDirectory() as folder:
        implementations = load_implementations(Path(folder))
    print(
        f"{args.seconds:g} s of audio, batch 1, fp32, {args.threads} threads, {args.clock} time, "
        f"torch {torch.__version__}"
    )
    load = os.getloadavg()[0]
    print(f"load average {load:.1f} on {os.cpu_count()} cores" + (" (shared: timings are noisy)" if load > 1 else ""))
    print(f"{'implementation':<16}{'encode s':>10}{'x rt':>8}{'decode s':>10}{'x rt':>8}{'stream ms/frame':>17}")
    results = {}
    for name, (encode, decode, stream) in implementations.items():
        encode_s, decode_s = best_time(partial(encode, wav)), best_time(partial(decode, codes))
        stream_s = stream(stream_codes) if stream else float("nan")
        results[name] = (encode_s, decode_s, stream_s)
        print(
            f"{name:<16}{encode_s:>10.3f}{args.seconds / encode_s:>8.1f}"
            f"{decode_s:>10.3f}{args.seconds / decode_s:>8.1f}{stream_s * 1000:>17.1f}"
        )
    ours = results.pop("csm.mimi")
    for column, label in ((0, "encode"), (1, "decode"), (2, "stream")):
        rivals = {name: r[column] for name, r in results.items() if r[column] == r[column]}
        if rivals:
            best = min(rivals, key=rivals.get)
            ratio = rivals[best] / ours[column]
            print(f"{label}: csm.mimi is {ratio:.2f}x the speed of {best}, the fastest other")


if __name__ == "__main__":
    main()
