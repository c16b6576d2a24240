"""`csm bench --quality` on full-size random weights: the speed and agreement figures of docs/performance.md.

    python benchmarks/bench_quality.py [--workdir DIR] [csm bench options...]

Writes once, into `--workdir`: a CSM-1B-sized checkpoint of random fp32 weights in the
original layout (6.2 GB, as `bench_csm.py` writes it, then with the heads of the three codes
past Mimi's 2048 zeroed so that streamed frames always decode), a tiny tokenizer beside it
(random weights read any ids) and a random full-size Mimi. Then runs `csm bench --quality`
on them, on the CPU, passing any further options on (default: `--frames 16`).

Random weights only show that each number format's kernels compute what they should: a
format's agreement with bf16 here says nothing about how it sounds with the real weights.
Measure that with `csm bench --quality` on the real model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_csm import write_random_checkpoint
from csm.cli import main as csm
from csm.model import CSMConfig
from tests.factories.mimi import write_moshi_checkpoint
from tests.factories.tokenizer import write_tiny_tokenizer

MIMI_CODES = 2048


def write_speakable_checkpoint(directory: Path) -> Path:
    """A random full-size checkpoint whose top-k never holds a code Mimi cannot decode."""
    weights = directory / "model.safetensors"
    done = directory / "speakable"
    if done.is_file():
        return directory
    write_random_checkpoint(directory, CSMConfig())
    # Zero the heads' rows of codes 2048..2050 in place: their logits become 0, far below the
    # top 50 of 2048 random logits.
    with weights.open("rb") as file:
        length = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(length))
    for name, zero in (("codebook0_head.weight", np.s_[MIMI_CODES:]), ("audio_head", np.s_[..., MIMI_CODES:])):
        entry = header[name]
        assert entry["dtype"] == "F32", entry
        tensor = np.memmap(
            weights, dtype="<f4", mode="r+", offset=8 + length + entry["data_offsets"][0], shape=tuple(entry["shape"])
        )
        tensor[zero] = 0
        tensor.flush()
    done.touch()
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/csm-bench-quality"), help="where the weights go")
    args, bench_options = parser.parse_known_args()
    model = write_speakable_checkpoint(args.workdir / "csm-1b-random")
    if not (model / "tokenizer.json").is_file():
        write_tiny_tokenizer(model / "tokenizer.json")
    mimi = args.workdir / "mimi.safetensors"
    if not mimi.is_file():
        write_moshi_checkpoint(mimi)
    options = bench_options or ["--frames", "16"]
    sys.exit(csm(["bench", "--quality", "--model", str(model), "--mimi", str(mimi), "--device", "cpu", *options]))


if __name__ == "__main__":
    main()
