"""`csm quantize`: write a quantized copy of the CSM weights."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def add_commands(commands) -> None:
    quantize = commands.add_parser(
        "quantize",
        help="write a quantized copy of the CSM weights",
        description="Quantize the linears of CSM (SOURCE: hub repo, folder or file) to int8 or int4 "
        "and write FOLDER: model.safetensors, config.json and the model's tokenizer and voice prompts. "
        "Use FOLDER as --model; it loads quantized, offline.",
    )
    quantize.add_argument("source", metavar="SOURCE", help="CSM weights: hub repo, folder or file")
    quantize.add_argument("-o", "--output", required=True, type=Path, metavar="FOLDER", help="folder to write")
    quantize.add_argument(
        "--to",
        required=True,
        choices=("int8", "int4"),
        help="the quantized format; an int8 folder runs as --quantize int8 (weight-only, the default) "
        "or int8-dynamic (int8 activations too)",
    )
    quantize.add_argument("--revision", help="revision of a hub SOURCE")
    quantize.set_defaults(run=_quantize)


def _quantize(args: argparse.Namespace) -> int:
    from csm.loading import load_csm
    from csm.quantized_checkpoint import WEIGHTS_FILE, save_quantized

    if args.output.exists() and any(args.output.iterdir()):
        raise ValueError(f"{args.output} is not empty: choose a new folder")
    started = time.perf_counter()
    model = load_csm(args.source, revision=args.revision, dtype=torch.bfloat16)
    save_quantized(model, args.output, args.to, source=args.source, revision=args.revision)
    size = (args.output / WEIGHTS_FILE).stat().st_size
    print(
        f"{args.output}: {args.to} weights, {size / 1e9:.2f} GB, in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    return 0
