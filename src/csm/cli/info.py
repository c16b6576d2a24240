"""`csm info`: versions, device and where each artifact resolves."""

from __future__ import annotations

import argparse

from csm.cli.options import add_sources, resolve_device


def add_commands(commands) -> None:
    info = commands.add_parser("info", help="show versions, device and where the weights are")
    add_sources(info)
    info.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    info.add_argument("--dtype", help="float32, bfloat16 or float16 (default: best for the device)")
    info.set_defaults(run=_info)


def _info(args: argparse.Namespace) -> int:
    from importlib.metadata import version

    from csm import checkpoints, text
    from csm.devices import default_dtype, parse_dtype
    from csm.hub import cached_file
    from csm.mimi import loading
    from csm.voices import VOICE_TRANSCRIPTS, voice_file
    from csm.watermark.watermarker import WEIGHTS_FOLDER

    # Distribution names; csm's own is csm-torch (PyPI's `csm` is another project).
    packages = ("csm-torch", "torch", "numpy", "safetensors", "huggingface_hub", "tokenizers", "soundfile", "soxr")
    print("versions: " + ", ".join(f"{name} {version(name)}" for name in packages))
    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype) if args.dtype else default_dtype(device)
    print(f"device: {device}, CSM dtype: {str(dtype).removeprefix('torch.')} (Mimi and watermark: float32)")
    artifacts = [
        ("CSM weights", args.model, checkpoints.WEIGHT_FILES),
        ("text tokenizer", args.tokenizer or args.model, [text.TOKENIZER_FILE]),
        ("Mimi weights", args.mimi, loading.CANDIDATES),
        *[
            (f"watermark {name}", args.watermarker, [f"{WEIGHTS_FOLDER}/{name}", name])
            for name in ("enc_c.ckpt", "dec_c.ckpt", "dec_m_0.ckpt")
        ],
        *[(f"voice {name}", args.model, [voice_file(name)]) for name in VOICE_TRANSCRIPTS],
    ]
    for what, source, candidates in artifacts:
        found = cached_file(source, candidates)
        where = f"cached at {found}" if found else f"not cached (looks for {', '.join(candidates)})"
        print(f"{what}: {source}: {where}")
    return 0
