"""Continuous batching: many requests share one model, each in its own row of the KV caches.

    with Engine(generator, max_batch=8) as engine:
        handle = engine.submit(Request(text="Hello there.", speaker=0, seed=1))
        for chunk in handle:  # 1-D float32 at 24 kHz, as frames are decoded
            play(chunk)

Requests come from any thread or asyncio loop. `submit` returns at once: a request is checked
and its prompt made (new context audio encoded) on a thread of its own, never on the worker;
beyond the rows requests wait in a bounded queue, and `reserve` holds a place for a caller that
submits several in turn. A request never runs more than `max_ahead_s` of audio ahead of its
reader: its row waits, and is cancelled if the reader stays away. If the worker ever dies,
every request fails at once with the reason (`Engine.failure`). A request computes exactly
what `Generator.generate` computes for it alone: see `csm.batching`. Streamed chunks are not
watermarked, so that a server can watermark them as it designs; `Handle.result` gives the
whole clip, watermarked.

The engine is three parts, as in nano-vllm:
- `csm.engine.requests`: what a caller holds (`Request`, `Handle`, `Admission`) and the stream
  of chunks behind a handle;
- `csm.engine.scheduler`: what is decided -- places, the waiting queue, which rows decode,
  prefill (a chunk's worth of positions a turn) or wait for their readers, client timeouts;
- `csm.engine.runner`: what runs -- the worker thread, its frame steps through
  `csm.batching`, the streaming Mimi decode over the rows, delivery to the handles, and its
  supervision.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from csm.engine.requests import (
    Admission,
    ClientTimeoutError,
    EngineClosedError,
    EngineFailedError,
    Handle,
    QueueFullError,
    Request,
    Stream,
)
from csm.engine.runner import Runner
from csm.engine.scheduler import Scheduler
from csm.errors import GenerationError
from csm.generator import Generator, check_arguments
from csm.threads import SerialQueue

__all__ = [
    "Admission",
    "ClientTimeoutError",
    "Engine",
    "EngineClosedError",
    "EngineFailedError",
    "GenerationError",
    "Handle",
    "QueueFullError",
    "Request",
]


class Engine:
    """Serves requests with `generator`'s model, `max_batch` rows at once, `max_queue` waiting.

    A request runs at most `max_ahead_s` of audio ahead of its reader: past that its row waits
    (it makes no frames) until the reader is halfway back; once it has waited `client_timeout_s`
    with its reader reading nothing, it is cancelled and its handle raises ClientTimeoutError.
    The engine owns the model until `close` (`Generator.claim`: the generator refuses to
    generate meanwhile).
    """

    def __init__(
        self,
        generator: Generator,
        max_batch: int = 8,
        max_queue: int = 64,
        *,
        max_ahead_s: float = 4.0,
        client_timeout_s: float = 30.0,
    ):
        for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, value in (("max_ahead_s", max_ahead_s), ("client_timeout_s", client_timeout_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        generator.claim(self)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_ahead_s = max_ahead_s
        self.client_timeout_s = client_timeout_s
        self._generator = generator
        max_ahead = round(max_ahead_s * generator.sample_rate)  # samples
        self._scheduler = Scheduler(max_batch, max_queue, max_ahead, client_timeout_s, generator.sample_rate)
        self._preparer = SerialQueue("csm-engine-prepare")
        try:
            self._runner = Runner(generator, self._scheduler)
        except BaseException:
            generator.release(self)
            raise

    @property
    def failure(self) -> BaseException | None:
        """Why the worker died, if it did (then every request fails with EngineFailedError)."""
        return self._scheduler.failure

    def __enter__(self) -> Engine:  # noqa: PYI034 -- typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def reserve(self) -> Admission:
        """Hold a place for a request that will submit several utterances one after another.

        Raises QueueFullError when every place is taken, EngineClosedError when closed and
        EngineFailedError when the worker died.
        """
        return self._scheduler.reserve()

    def submit(self, request: Request, admission: Admission | None = None) -> Handle:
        """Queue `request` and return at once; with an `admission`, in the place it holds.

        Raises at once a ValueError naming a bad argument (types and ranges), QueueFullError
        (no admission and no free place: retry later), EngineClosedError or EngineFailedError.
        What takes torch work -- the samples of context audio, the prompt's length, encoding
        new context audio -- is checked on a thread of its own: a bad request then raises its
        ValueError from `await handle.checked()` and from iteration.
        """
        if not isinstance(request, Request):
            raise ValueError(f"submit takes a csm.engine.Request, got {type(request).__name__}")  # noqa: TRY004
        check_arguments(*request.arguments())
        stream = self._scheduler.enter(request, admission)
        self._preparer.submit(self._prepare, stream)
        return Handle(stream, self._generator.watermark)

    def stats(self) -> dict[str, float | int]:
        """Counters and recent figures: queue, rows in use, frames, frames/s, time to first audio."""
        return self._scheduler.stats()

    def close(self) -> None:
        """Stop: waiting and running requests end with EngineClosedError; the model goes back to the generator."""
        if not self._scheduler.close():
            return
        self._scheduler.fail_waiting(lambda: EngineClosedError("the engine was closed before this request started"))
        self._preparer.join()  # no prompt is being made with the generator once it is back
        self._runner.join()
        self._generator.release(self)

    def _prepare(self, stream: Stream) -> None:
        """Check a request and make its prompt (encoding new context audio), on the preparer's
        thread; the scheduler then queues it for a row."""
        request, generator = stream.request, self._generator
        prompt = sampling = error = None
        try:
            if stream.finished:
                return
            generator.check_request(*request.arguments())
            prompt = generator.prompt(request.text, request.speaker, request.context)
            sampling = generator.sampling(request.max_audio_length_ms, request.temperature, request.topk, request.seed)
            if request.seed is None:
                # Its own generator, so that a request never draws from another's noise.
                rng = torch.Generator(generator.device)
                rng.seed()
                sampling = replace(sampling, generator=rng)
        except Exception as caught:  # noqa: BLE001 -- whatever it is, it fails this request only
            error = caught
        self._scheduler.prepared(stream, prompt, sampling, error)
