"""`csm serve`: the OpenAI-compatible speech server."""

from __future__ import annotations

import argparse
from pathlib import Path

from csm.cli.options import add_sources, add_speed, resolve_device, watermark_key


def add_commands(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the OpenAI-compatible speech server",
        description="Serve POST /v1/audio/speech (OpenAI's API), voices, /v1/models, /health, /metrics and a "
        "web page at /, batching concurrent requests. Needs the serve extra: pip install 'csm[serve]'.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    add_sources(serve)
    serve.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    serve.add_argument("--dtype", help="CSM number format: float32, bfloat16 or float16 (default: best for the device)")
    add_speed(serve)
    serve.add_argument(
        "--adapter", metavar="SOURCE", help="a fine-tuned LoRA adapter (PEFT format): hub repo, folder or file"
    )
    serve.add_argument("--max-batch", type=int, default=8, metavar="N", help="requests generated together (default 8)")
    serve.add_argument(
        "--max-queue", type=int, default=64, metavar="N",
        help="requests waiting beyond those; more get 429 (default 64; 0: none wait)",
    )  # fmt: skip
    serve.add_argument(
        "--max-request-seconds", type=float, default=120.0, metavar="S",
        help="audio one request may make, whole or streamed; longer ones end at S (default 120)",
    )  # fmt: skip
    serve.add_argument(
        "--client-timeout", type=float, default=30.0, metavar="S",
        help="a client that reads nothing for S seconds while its audio waits is cut off (default 30)",
    )  # fmt: skip
    serve.add_argument(
        "--max-voices", type=int, default=1000, metavar="N",
        help="uploaded voices kept; uploads past N get 400 (default 1000)",
    )  # fmt: skip
    serve.add_argument(
        "--api-key", metavar="KEY", help="require Authorization: Bearer KEY on every endpoint but /health "
        "(default: the CSM_API_KEY environment variable; none: no key)",
    )  # fmt: skip
    serve.add_argument(
        "--voices-dir", type=Path, default=Path("~/.local/share/csm/voices"), metavar="DIR",
        help="where uploaded voices are kept (default ~/.local/share/csm/voices)",
    )  # fmt: skip
    serve.add_argument(
        "--cors-origin", action="append", default=[], metavar="ORIGIN",
        help="allow browser calls from ORIGIN (repeatable)",
    )  # fmt: skip
    serve.add_argument("--no-watermark", action="store_true", help="do not watermark any response (logged at startup)")
    serve.add_argument(
        "--watermark-key", type=watermark_key, default=None, metavar="K1,...,K5", help="your own 5-byte watermark key"
    )
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:
        from csm.server.main import ServeOptions, api_key_from_environment, serve
    except ImportError as error:
        missing = error.name or "a dependency"
        raise ValueError(f"csm serve needs the serve extra ({missing} is missing): pip install 'csm[serve]'") from None
    from csm.devices import default_dtype, parse_dtype

    for name, low in (("max_batch", 1), ("max_queue", 0), ("max_voices", 0)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    if not args.max_request_seconds >= 0.08:  # also refuses NaN
        raise ValueError(f"--max-request-seconds must be at least 0.08 (one frame), got {args.max_request_seconds}")
    if not 0 < args.client_timeout < float("inf"):
        raise ValueError(f"--client-timeout must be a positive number of seconds, got {args.client_timeout}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be 0-65535, got {args.port}")
    device = resolve_device(args.device)
    serve(
        ServeOptions(
            host=args.host,
            port=args.port,
            model=args.model,
            mimi=args.mimi,
            tokenizer=args.tokenizer,
            watermarker=args.watermarker,
            device=device,
            dtype=parse_dtype(args.dtype) if args.dtype else default_dtype(device),
            quantize=args.quantize,
            compile=args.compile,
            adapter=args.adapter,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            max_request_seconds=args.max_request_seconds,
            max_voices=args.max_voices,
            client_timeout=args.client_timeout,
            api_key=args.api_key or api_key_from_environment(),
            voices_dir=str(args.voices_dir.expanduser()),
            cors_origins=tuple(args.cors_origin),
            watermark=False if args.no_watermark else (args.watermark_key or True),
        )
    )
    return 0
