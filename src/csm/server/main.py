"""The `csm serve` process: load the model, start the engine and uvicorn, shut down cleanly.

uvicorn handles SIGINT and SIGTERM: it stops accepting connections, gives running
responses `SHUTDOWN_GRACE_SECONDS` to finish, then cancels them (which cancels their
engine requests); the engine closes last.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import time
from dataclasses import dataclass

import torch
import uvicorn

from csm.engine import Engine
from csm.generator import load_csm_1b
from csm.server.app import create_app
from csm.server.backend import LocalBackend
from csm.server.speech import SpeechService
from csm.server.voices import OPENAI_VOICES, Voices, VoiceStore, builtin_voices
from csm.threads import make_this_thread_serial, run_in_fresh_thread

log = logging.getLogger("csm.server")

SHUTDOWN_GRACE_SECONDS = 10
MALLOC_ARENAS = 2


@dataclass(frozen=True)
class ServeOptions:
    host: str
    port: int
    model: str
    mimi: str
    tokenizer: str | None
    watermarker: str
    device: torch.device
    dtype: torch.dtype
    quantize: str | None
    compile: bool
    adapter: str | None
    max_batch: int
    max_queue: int
    max_request_seconds: float
    max_voices: int
    client_timeout: float
    api_key: str | None
    voices_dir: str
    cors_origins: tuple[str, ...]
    watermark: bool | list[int]


def serve(options: ServeOptions) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _limit_malloc_arenas(MALLOC_ARENAS)
    # This thread runs the event loop: its torch work (checks, joins, encoding) stays serial,
    # so that the engine's thread is the only one holding OpenMP workers (see csm.threads).
    make_this_thread_serial()
    started = time.perf_counter()
    generator = load_csm_1b(
        options.device,
        dtype=options.dtype,
        model=options.model,
        mimi=options.mimi,
        tokenizer=options.tokenizer,
        watermark=options.watermark,
        watermarker=options.watermarker,
        quantize=options.quantize,
        compile=options.compile,
        adapter=options.adapter,
    )
    builtin = run_in_fresh_thread(builtin_voices, options.model)  # as loading: see csm.threads
    voices = Voices(builtin, VoiceStore(options.voices_dir, options.max_voices))
    log.info(
        "loaded CSM %s (%s%s%s) on %s, Mimi %s, in %.1f s",
        options.model, str(options.dtype).removeprefix("torch."),
        f", {options.quantize}" if options.quantize else "", f", adapter {options.adapter}" if options.adapter else "",
        options.device, options.mimi, time.perf_counter() - started,
    )  # fmt: skip
    if options.watermark:
        log.info("watermark: on (every clip, streamed clips of 1.04 s each marked on their own)")
    else:
        log.warning("watermark: OFF for every response (--no-watermark)")
    log.info(
        "voices: built-in %s; %d stored in %s (at most %d); OpenAI names %s",
        ", ".join(builtin) or "none (the model folder has no prompts/)", len(voices.store), voices.store.folder,
        options.max_voices,
        ", ".join(f"{name}={voices.mapping(name)}" for name in OPENAI_VOICES),
    )  # fmt: skip
    log.info("API key: %s", "required" if options.api_key else "none (anyone who can reach the port may use it)")
    engine = Engine(
        generator, max_batch=options.max_batch, max_queue=options.max_queue, client_timeout_s=options.client_timeout
    )
    with engine:
        mark = generator.watermark if options.watermark else None
        service = SpeechService(engine, generator, voices, mark, options.max_request_seconds)
        app = create_app(LocalBackend(service), api_key=options.api_key, cors_origins=options.cors_origins)
        log.info(
            "engine: %d slots, queue of %d; at most %g s of audio a request; readers %g s behind are cut off; "
            "serving on http://%s:%d/",
            options.max_batch,
            options.max_queue,
            options.max_request_seconds,
            options.client_timeout,
            _host(options.host),
            options.port,
        )
        config = uvicorn.Config(
            app,
            host=options.host,
            port=options.port,
            log_level="info",
            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
        )
        uvicorn.Server(config).run()
    log.info("stopped")


def _limit_malloc_arenas(arenas: int) -> None:
    """Cap glibc's malloc arenas (unless MALLOC_ARENA_MAX already does).

    glibc gives threads their own arenas, up to 8 per core, and each arena keeps the memory it
    freed. The server runs uploads, voice storage and the watermark on threads of their own
    (see csm.threads). In the load test (`tests/server/test_load.py`) its resident memory sat
    ~190 MB higher with the default 16 arenas (2 cores) and swung by up to 90 MB from one burst
    to the next; with two it stays within ~30 MB, at the same speed within the noise.
    """
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc's (musl's ignores it; others lack it)
    if mallopt is not None:
        mallopt(-8, arenas)  # M_ARENA_MAX in glibc's malloc.h


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def api_key_from_environment() -> str | None:
    return os.environ.get("CSM_API_KEY") or None
