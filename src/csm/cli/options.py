"""What several commands share: model sources, speed and generation options, the watermark key,
the device, and loading a generator from those options."""

from __future__ import annotations

import argparse
import sys

import torch

# Mimi's rate: every audio file is read at it and every output written at it.
SAMPLE_RATE = 24_000


def add_generation(command: argparse.ArgumentParser, default_seconds: float) -> None:
    command.add_argument("--seed", type=int, help="random seed, for reproducible output")
    command.add_argument("--temperature", type=float, default=0.9, help="sampling temperature (default 0.9)")
    command.add_argument("--topk", type=int, default=50, help="sample among the K most likely codes (default 50)")
    command.add_argument(
        "--max-seconds",
        type=float,
        default=default_seconds,
        metavar="S",
        help=f"longest audio per chunk or turn, in seconds (default {default_seconds:g})",
    )
    command.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    command.add_argument(
        "--dtype", help="CSM number format: float32, bfloat16 or float16 (default: best for the device)"
    )
    add_speed(command)
    add_sources(command)
    command.add_argument(
        "--adapter", metavar="SOURCE", help="a fine-tuned LoRA adapter (PEFT format): hub repo, folder or file"
    )
    command.add_argument("--no-watermark", action="store_true", help="do not watermark the output")
    command.add_argument(
        "--watermark-key", type=watermark_key, default=None, metavar="K1,...,K5", help="your own 5-byte watermark key"
    )


def load_generator(args: argparse.Namespace):
    from csm.devices import default_dtype, parse_dtype
    from csm.generator import load_csm_1b

    if args.max_seconds <= 0:
        raise ValueError(f"--max-seconds must be positive, got {args.max_seconds:g}")
    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype) if args.dtype else default_dtype(device)
    watermark = False if args.no_watermark else (args.watermark_key or True)
    if args.compile:
        print(
            "csm: note: --compile: the first frame waits for the compiler (a minute or more on a CPU)", file=sys.stderr
        )
    return load_csm_1b(
        device,
        dtype=dtype,
        model=args.model,
        mimi=args.mimi,
        tokenizer=args.tokenizer,
        watermark=watermark,
        watermarker=args.watermarker,
        quantize=args.quantize,
        compile=args.compile,
        adapter=args.adapter,
    )


def add_sources(command: argparse.ArgumentParser, *, watermarker: bool = True) -> None:
    command.add_argument(
        "--model", default="sesame/csm-1b", metavar="SOURCE", help="CSM weights: hub repo, folder or file"
    )
    command.add_argument(
        "--mimi",
        default="kyutai/moshiko-pytorch-bf16",
        metavar="SOURCE",
        help="Mimi codec weights: hub repo, folder or file",
    )
    command.add_argument(
        "--tokenizer",
        metavar="SOURCE",
        help="text tokenizer: hub repo, folder or tokenizer.json (default: the model's)",
    )
    if watermarker:
        command.add_argument(
            "--watermarker",
            default="sony/silentcipher",
            metavar="SOURCE",
            help="watermark weights: hub repo, folder or file",
        )


def add_speed(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--quantize",
        choices=("int8", "int8-dynamic", "int4"),
        help="quantize CSM's linears: int8 and int4 are weight-only (bfloat16 activations); int8-dynamic "
        "multiplies the int8 weights by activations quantized to int8 per row (faster, a little less exact). "
        "Faster and smaller, slightly different output; a folder from `csm quantize` is quantized already "
        "(an int8 folder runs as int8 or int8-dynamic)",
    )
    command.add_argument(
        "--compile",
        action="store_true",
        help="compile CSM's frame step with torch.compile (the first frame waits for the compiler; "
        "csm serve compiles the graphs of every batch size before it serves)",
    )


def watermark_key(text: str) -> list[int]:
    try:
        key = [int(part) for part in text.split(",")]
    except ValueError:
        key = []
    if len(key) != 5 or not all(0 <= byte <= 255 for byte in key):
        raise argparse.ArgumentTypeError(f"a watermark key is 5 comma-separated bytes (0-255), got {text!r}")
    return key


def resolve_device(name: str | None) -> torch.device:
    from csm.devices import default_device, parse_device

    return parse_device(name) if name else default_device()
