"""`csm bench`: speed, memory and (with --quality) accuracy of each number format, as tables."""

from __future__ import annotations

import argparse
import sys

import torch
from tqdm import tqdm

from csm.cli.options import add_sources, resolve_device


def add_commands(commands) -> None:
    bench = commands.add_parser(
        "bench",
        help="measure speed, memory and (with --quality) accuracy of each number format here",
        description="For each mode, load CSM, stream a fixed utterance after a short warm-up and report "
        "seconds per frame (80 ms of audio, Mimi decode included), the real-time factor, the time to the "
        "first 80 ms of audio, and memory; then print a table. With --quality, also score each mode's "
        "teacher-forced predictions against the unquantized --dtype model, with float32 as the noise floor.",
    )
    bench.add_argument(
        "--quantize",
        metavar="MODES",
        help="comma-separated modes to measure: fp32, bf16, fp16 (unquantized), int8, int4 (weight-only, "
        "bfloat16 activations), int8-dynamic (int8 weights and activations) (default: the --dtype model, "
        "int8, int8-dynamic and int4; a `csm quantize` folder: its format)",
    )
    bench.add_argument(
        "--compile",
        action="store_true",
        help="also run each mode with its frame step compiled by torch.compile (the warm-up includes the compilation)",
    )
    bench.add_argument(
        "--frames", type=int, default=25, metavar="N", help="timed frames per mode (default 25: 2 s of audio)"
    )
    bench.add_argument(
        "--quality",
        action="store_true",
        help="also compare each mode's predictions with the reference's on a fixed prompt (the model's "
        "built-in voices, else synthetic audio): top-1 agreement and KL divergence per codebook",
    )
    bench.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    bench.add_argument(
        "--dtype",
        help="float32, bfloat16 or float16: the reference, and the default mode (default: best for the device)",
    )
    add_sources(bench, watermarker=False)
    bench.set_defaults(run=_bench)


def _bench(args: argparse.Namespace) -> int:
    from csm import quality
    from csm.bench import WARMUP_FRAMES, Mode, benchmark, default_modes, parse_modes, teacher_forced, with_compiled
    from csm.checkpoints import open_checkpoint
    from csm.devices import default_dtype, parse_dtype
    from csm.mimi import Mimi
    from csm.quantize import MODES, stored_format
    from csm.text import load_tokenizer

    if args.frames < 2:
        raise ValueError(f"--frames must be at least 2, got {args.frames}")
    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype) if args.dtype else default_dtype(device)
    # Opened first (config and tensor names only), so that a wrong --model fails at once.
    quantized = open_checkpoint(args.model).quantization
    if quantized:
        modes = parse_modes(args.quantize or quantized)
        # An int8 folder runs in both int8 modes.
        if args.quality or any(mode.quantize is None or stored_format(mode.quantize) != quantized for mode in modes):
            raise ValueError(
                f"{args.model} holds {quantized} weights only: it runs as --quantize "
                f"{' or '.join(mode for mode in MODES if stored_format(mode) == quantized)}, without "
                "--quality (which compares with the unquantized model); pass the original weights for more"
            )
    else:
        modes = parse_modes(args.quantize) if args.quantize else default_modes(dtype)
    if args.compile:
        modes = with_compiled(modes)
    tokenizer = load_tokenizer(args.tokenizer, model_source=args.model)
    mimi = Mimi.from_pretrained(args.mimi, device=device, dtype=torch.float32, num_codebooks=32)
    sequence, source, scored, scored_only = None, "", [], []
    if args.quality:
        segments, source = quality.prompt_segments(args.model)
        sequence = quality.teacher_forcing_sequence(tokenizer, mimi, segments)
        # Compiling changes no number format: a compiled twin predicts what its eager mode does.
        scored = [mode for mode in modes if not mode.compile]
        # The reference and the noise floor are scored even when their speed is not asked for.
        measured = {mode.format for mode in modes}
        scored_only = [
            Mode(each) for each in dict.fromkeys([dtype, torch.float32]) if Mode(each).format not in measured
        ]
    scored_frames = 0 if sequence is None else len(sequence.scored)
    total = len(modes) * (WARMUP_FRAMES + args.frames) + (len(scored) + len(scored_only)) * scored_frames
    results, logits = [], {}
    with tqdm(total=total, desc="bench", unit="frame", file=sys.stderr) as bar:
        for mode in modes:
            result = benchmark(
                mode,
                model=args.model,
                mimi=mimi,
                tokenizer=tokenizer,
                device=device,
                frames=args.frames,
                sequence=sequence if mode in scored else None,
                progress=bar,
            )
            results.append(result)
            if result.logits is not None:
                logits[mode.format] = result.logits
        for mode in scored_only:
            logits[mode.format] = teacher_forced(mode, model=args.model, device=device, sequence=sequence, progress=bar)
    print(f"csm bench: {args.model} on {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    headers = ["mode", "load s", "warm-up s", "first audio s", "s/frame", "real-time factor", "resident GB", "peak GB"]
    rows = [
        [
            result.mode.name,
            f"{result.load_seconds:.1f}",
            f"{result.warmup_seconds:.2f}",
            f"{result.first_audio_seconds:.3f}",
            f"{result.seconds_per_frame:.3f}",
            f"{result.real_time_factor:.2f}",
            _gigabytes(result.resident_bytes),
            _gigabytes(result.peak_bytes),
        ]
        for result in results
    ]
    _print_table(headers, rows)
    _print_kernels(results)
    if sequence is not None:
        _print_quality(logits, Mode(dtype).format, len(sequence.scored), source)
    return 0


def _print_kernels(results: list) -> None:
    """The one-row kernel chosen for each weight shape (`csm.kernels`) and each candidate's GB/s."""
    from csm.kernels import KERNELS, cache_path

    products = {(product.shape, product.label): product for result in results for product in result.kernels}
    if not products:
        return
    print(f"\none-row kernels, GB/s of weight read (measured once on this machine; cache: {cache_path()}):")
    headers = ["products", "weight", "kernel", *KERNELS]
    rows = [
        [
            product.label,
            str(product.shape),
            product.kernel,
            *(f"{product.choice.gbps[name]:.3g}" if name in product.choice.gbps else "-" for name in KERNELS),
        ]
        for product in products.values()
    ]
    _print_table(headers, rows)


def _print_quality(logits: dict, reference: str, frames: int, source: str) -> None:
    from csm.quality import compare

    compared = {name: compare(logits[reference], values) for name, values in logits.items() if name != reference}
    if not compared:
        print(f"\nquality: only the reference ({reference}) was run; name other modes to compare with it")
        return
    floor = "; fp32 is the noise floor" if "fp32" in compared else ""
    print(f"\nquality against {reference}, teacher-forced on {frames} frames of {source}{floor}:")
    headers = ["mode", "top-1 codebook 0", "top-1 codebooks 1-31", "worst codebook", "mean KL (nats)"]
    rows = [
        [
            name,
            f"{agreement.top1_backbone:.1%}",
            f"{agreement.top1_depth:.1%}",
            f"{float(agreement.top1.min()):.1%} ({int(agreement.top1.argmin())})",
            f"{agreement.kl_mean:.2e}",
        ]
        for name, agreement in compared.items()
    ]
    _print_table(headers, rows)
    print("\nper codebook: top-1 agreement / mean KL (nats)")
    rows = [
        [str(codebook), *(f"{float(a.top1[codebook]):.1%} / {float(a.kl[codebook]):.1e}" for a in compared.values())]
        for codebook in range(next(iter(compared.values())).top1.numel())
    ]
    _print_table(["codebook", *compared], rows)


def _gigabytes(size: int | None) -> str:
    return "n/a" if size is None else f"{size / 1e9:.2f}"


def _print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A Markdown table, columns padded to line up in a terminal."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    for line in [headers, ["-" * width for width in widths], *rows]:
        print("| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |")
