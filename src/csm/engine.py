"""Continuous batching: many requests share one model, each in its own row of the KV caches.

    with Engine(generator, max_batch=8) as engine:
        handle = engine.submit(Request(text="Hello there.", speaker=0, seed=1))
        for chunk in handle:  # 1-D float32 at 24 kHz, as frames are decoded
            play(chunk)

One worker thread owns the generator's model. Each turn of its loop it admits the waiting
requests that rows are free for into the rows above the decoding ones, runs the backbone's step
of every decoding row in one batched call, and feeds the prompts being prefilled their next
chunk, in order, until a chunk's worth of positions went in (so a burst of short prompts starts
together, and a long prompt stalls the others for about one frame per chunk, not for all of
it). It samples the frames of the decoding rows and the first frames of the prompts now all in
in one depth-decoder pass (a first frame costs a chunk of prefill, not a frame step of its
own), decodes them to audio in one batched streaming Mimi step (a request keeps its Mimi row
from its first frame to its end) for the requests' handles, and frees the rows of finished,
failed and cancelled requests, moving the last decoding row into each hole so that one step
covers them all. A request computes exactly what `Generator.generate` computes for it alone:
see `csm.batching`.

Requests come from any thread or asyncio loop; those beyond the rows wait in a bounded queue.
Streamed chunks are not watermarked, so that a server can watermark them as it designs;
`Handle.result` gives the whole clip, watermarked.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import torch

from csm import batching
from csm.errors import CSMError
from csm.generator import Generator, Segment
from csm.threads import run_in_fresh_thread

# Frames per second and time to first audio are reported over this recent window.
STATS_WINDOW_S = 10.0
STATS_REQUESTS = 100


class QueueFullError(CSMError):
    """The engine's queue of waiting requests is full; try again later."""


class EngineClosedError(CSMError):
    """The engine was closed before the request could finish."""


@dataclass(frozen=True)
class Request:
    """What to say, as for `Generator.generate`."""

    text: str
    speaker: int = 0
    context: Sequence[Segment] = ()
    max_audio_length_ms: float = 90_000
    temperature: float = 0.9
    topk: int = 50
    seed: int | None = None


class _Stream:
    """A request's chunks between the worker (producer) and its handle (consumer)."""

    def __init__(self, request: Request, engine: Engine):
        self.request = request
        self.engine = engine
        self.submitted = time.monotonic()
        self.first_audio: float | None = None
        self.cancelled = False
        self.finished = False
        self.error: BaseException | None = None
        self._chunks: deque[torch.Tensor] = deque()
        self._ready = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def put(self, chunk: torch.Tensor) -> None:
        with self._ready:
            if self.finished:
                return
            self._chunks.append(chunk)
            if self.first_audio is None:
                self.first_audio = time.monotonic()
        self._notify()

    def finish(self, error: BaseException | None = None) -> bool:
        """End the stream (with `error`); False if it had already ended."""
        with self._ready:
            if self.finished:
                return False
            self.finished = True
            self.error = error
        self._notify()
        return True

    def cancel(self) -> None:
        with self._ready:
            self.cancelled = True
            self._chunks.clear()
        if self.finish():
            self.engine._cancelled(self)

    def next(self, block: bool) -> torch.Tensor | None:
        """The next chunk; None when there is none yet (block=False). Raises at the end."""
        with self._ready:
            while block and not self._chunks and not self.finished:
                self._ready.wait()
            if self._chunks:
                return self._chunks.popleft()
            if self.finished:
                if self.error is not None and not self.cancelled:
                    raise self.error
                raise StopIteration
            return None

    def wait_async(self, loop: asyncio.AbstractEventLoop) -> asyncio.Event:
        """An event of `loop` set when a chunk or the end arrives (set now if one is there)."""
        event = asyncio.Event()
        with self._ready:
            if self._chunks or self.finished:
                event.set()
            else:
                self._waiters.append((loop, event))
        return event

    def _notify(self) -> None:
        with self._ready:
            self._ready.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(event.set)


class Handle:
    """A submitted request: iterate it, or `async for` it, for its audio chunks.

    Chunks are 1-D float32 tensors at 24 kHz on the CPU, one per frame (80 ms), not
    watermarked. Iteration ends at the end of speech or the length limit, or at `cancel`;
    it raises the request's error if it failed. Dropping the handle cancels the request.
    """

    def __init__(self, stream: _Stream, generator: Generator):
        self._stream = stream
        self._generator = generator
        weakref.finalize(self, stream.cancel)

    @property
    def request(self) -> Request:
        return self._stream.request

    def cancel(self) -> None:
        """Stop the request: its row is freed within one frame and iteration stops."""
        self._stream.cancel()

    def __iter__(self) -> Handle:
        return self

    def __next__(self) -> torch.Tensor:
        return self._stream.next(block=True)

    def __aiter__(self) -> Handle:
        return self

    async def __anext__(self) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        while True:
            try:
                chunk = self._stream.next(block=False)
            except StopIteration:
                raise StopAsyncIteration from None
            if chunk is not None:
                return chunk
            await self._stream.wait_async(loop).wait()

    def result(self) -> torch.Tensor:
        """The whole utterance (waiting for it), watermarked like `Generator.generate`'s."""
        chunks = list(self)
        audio = torch.cat(chunks) if chunks else torch.zeros(0)
        return self._generator.watermark(audio)


@dataclass
class _Active:
    """A request in a row: its stream, its sequence, and its row of the audio decoder once it speaks."""

    stream: _Stream
    sequence: batching.Sequence
    audio_row: int | None = None


@dataclass
class _Stats:
    frames: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    rejected: int = 0
    audio_seconds: float = 0.0
    steps: deque = field(default_factory=deque)  # (time, frames) of recent steps
    first_audio: deque = field(default_factory=lambda: deque(maxlen=STATS_REQUESTS))


class Engine:
    """Serves requests with `generator`'s model, `max_batch` rows at once, `max_queue` waiting.

    The engine owns the model until `close` (the generator refuses to generate meanwhile).
    """

    def __init__(self, generator: Generator, max_batch: int = 8, max_queue: int = 64):
        for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        generator._claim(self)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._generator = generator
        self._mimi = generator.mimi
        self._free_audio_rows = list(range(max_batch))
        self._lock = threading.Condition()
        self._queue: deque[_Stream] = deque()
        self._pending = 0  # submitted and not yet released: waiting or in a row
        self._closed = False
        self._stats = _Stats()
        self._started = time.monotonic()
        # Only the worker touches these.
        self._decoding: list[_Active] = []  # in rows 0 .. n-1, in order
        self._prefilling: list[_Active] = []  # in rows n, n+1, ..., in order
        started: Future[None] = Future()
        self._thread = threading.Thread(target=self._work, args=(started,), name="csm-engine", daemon=True)
        self._thread.start()
        try:
            started.result()
        except BaseException:
            generator._release(self)
            raise

    def __enter__(self) -> Engine:  # noqa: PYI034 -- typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def submit(self, request: Request) -> Handle:
        """Queue `request`; a ValueError names a bad field, QueueFullError says to retry later."""
        if not isinstance(request, Request):
            raise ValueError(f"submit takes a csm.engine.Request, got {type(request).__name__}")  # noqa: TRY004
        # Checking context audio is parallel torch work: on the caller's thread it would leave
        # that thread holding OpenMP workers beside the engine's (see csm.threads).
        run_in_fresh_thread(
            self._generator.check_request,
            request.text,
            request.speaker,
            request.context,
            request.max_audio_length_ms,
            request.temperature,
            request.topk,
            request.seed,
        )
        stream = _Stream(request, self)
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            if self._pending >= self.max_batch + self.max_queue:
                self._stats.rejected += 1
                raise QueueFullError(
                    f"the engine is full: {self.max_batch} rows and {self.max_queue} queue places taken; retry later"
                )
            self._queue.append(stream)
            self._pending += 1
            self._lock.notify_all()
        return Handle(stream, self._generator)

    def stats(self) -> dict[str, float | int]:
        """Counters and recent figures: queue, rows in use, frames, frames/s, time to first audio."""
        now = time.monotonic()
        with self._lock:
            stats = self._stats
            while stats.steps and stats.steps[0][0] < now - STATS_WINDOW_S:
                stats.steps.popleft()
            window = min(STATS_WINDOW_S, now - self._started)
            recent = sum(frames for _, frames in stats.steps)
            first_audio = sorted(stats.first_audio)
            return {
                "queue_length": len(self._queue),
                "active": self._pending - len(self._queue),
                "max_batch": self.max_batch,
                "max_queue": self.max_queue,
                "frames_generated": stats.frames,
                "frames_per_second": recent / window if window > 0 else 0.0,
                "audio_seconds": stats.audio_seconds,
                "requests_finished": stats.finished,
                "requests_failed": stats.failed,
                "requests_cancelled": stats.cancelled,
                "requests_rejected": stats.rejected,
                "time_to_first_audio_last_s": stats.first_audio[-1] if first_audio else 0.0,
                "time_to_first_audio_mean_s": sum(first_audio) / len(first_audio) if first_audio else 0.0,
                "time_to_first_audio_p50_s": _quantile(first_audio, 0.5),
                "time_to_first_audio_p95_s": _quantile(first_audio, 0.95),
            }

    def close(self) -> None:
        """Stop: waiting and running requests end with EngineClosedError; the model goes back to the generator."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiting, self._queue = list(self._queue), deque()
            self._pending -= len(waiting)
            self._lock.notify_all()
        for stream in waiting:
            stream.finish(EngineClosedError("the engine was closed before this request started"))
        if threading.current_thread() is not self._thread:
            self._thread.join()
        self._generator._release(self)

    # The worker thread.

    def _work(self, started: Future[None]) -> None:
        # The caches and Mimi's stream state are made here, so that this thread is the only
        # one whose torch work starts OpenMP workers while the engine runs (see csm.threads).
        try:
            self._audio = self._mimi.decode_stream(self.max_batch)
            self._batch = batching.Batch(self._generator.model, self._generator.voices)
            self._generator.model.setup_caches(self.max_batch)
        except BaseException as error:  # noqa: BLE001 -- raised by the constructor
            started.set_exception(error)
            return
        started.set_result(None)
        while True:
            with self._lock:
                while not (self._closed or self._queue or self._decoding or self._prefilling):
                    self._lock.wait()
                if self._closed:
                    break
                # Every waiting request that a row is free for.
                free = self.max_batch - len(self._decoding) - len(self._prefilling)
                incoming = [self._queue.popleft() for _ in range(min(free, len(self._queue)))]
            try:
                self._turn(incoming)
            except Exception as error:  # noqa: BLE001 -- a bug or an exhausted device: fail what runs, keep serving
                self._fail_all(error)
        self._fail_all(EngineClosedError("the engine was closed before this request finished"))

    def _turn(self, incoming: list[_Stream]) -> None:
        """One turn: admit, one batched frame, prefill chunks, audio out, rows freed."""
        for stream in incoming:
            self._admit(stream)
        self._drop_cancelled()
        self._release()
        stepping, states = self._advance()
        # The decoding rows step first. The prompts being prefilled get their next chunk in
        # order until a chunk's worth of positions went in this turn, so a burst of short
        # prompts starts together while a long one still stalls the others for about one chunk.
        # A prompt that is all in joins the decoding rows' depth-decoder pass for its first
        # frame (its row is right above theirs), then decodes with them.
        fed = 0
        for active in list(self._prefilling):
            if fed >= batching.PREFILL_CHUNK:
                break
            start = active.sequence.prefilled
            state = self._feed(active)
            if state is None:  # not all in yet, or failed: the rows above are not contiguous
                break
            fed += active.sequence.prefilled - start
            stepping.append(active)
            states.append(state[None])
        frames = self._sample(stepping, states) if stepping else []
        if frames:
            self._speak(frames)
        self._release()

    def _admit(self, stream: _Stream) -> None:
        if stream.cancelled:
            self._end(stream)
            return
        request = stream.request
        generator = self._generator
        try:
            prompt = generator.prompt(request.text, request.speaker, request.context)
            sampling = generator.sampling(request.max_audio_length_ms, request.temperature, request.topk, request.seed)
            if request.seed is None:
                # Its own generator, so that a request never draws from another's noise.
                rng = torch.Generator(generator.device)
                rng.seed()
                sampling = replace(sampling, generator=rng)
            sequence = self._batch.start(prompt, sampling, len(self._decoding) + len(self._prefilling))
        except Exception as error:  # noqa: BLE001 -- whatever it is, it fails these requests only
            self._end(stream, error)
            return
        self._prefilling.append(_Active(stream, sequence))

    def _drop_cancelled(self) -> None:
        for active in self._decoding:
            if active.stream.cancelled:
                active.sequence.done = True
        for active in [active for active in self._prefilling if active.stream.cancelled]:
            self._prefilling.remove(active)
            self._end(active.stream)

    def _advance(self) -> tuple[list[_Active], list[torch.Tensor]]:
        """The decoding rows' backbone step: the rows and their states, or none if it failed."""
        if not self._decoding:
            return [], []
        try:
            states = self._batch.advance([active.sequence for active in self._decoding])
        except Exception as error:  # noqa: BLE001 -- whatever it is, it fails these requests only
            self._fail(self._decoding, error)
            return [], []
        return list(self._decoding), [states]

    def _feed(self, active: _Active) -> torch.Tensor | None:
        """The next chunk of a prompt being prefilled: the state its first frame follows, once all in."""
        try:
            return self._batch.feed(active.sequence)
        except Exception as error:  # noqa: BLE001 -- whatever it is, it fails this request only
            self._prefilling.remove(active)
            self._end(active.stream, error)
            return None

    def _sample(self, stepping: list[_Active], states: list[torch.Tensor]) -> list[tuple[_Active, torch.Tensor]]:
        """One depth-decoder pass for every row that stepped: their frames."""
        try:
            frames = self._batch.sample([active.sequence for active in stepping], torch.cat(states))
        except Exception as error:  # noqa: BLE001 -- whatever it is, it fails these requests only
            frames = [None] * len(stepping)
            self._fail(stepping, error)
        for active, frame in zip(stepping, frames, strict=True):
            if active in self._prefilling:
                # Its first frame is out, or it ended (end of speech at once, or a failure).
                self._prefilling.remove(active)
                if active.sequence.done and frame is None:
                    self._end(active.stream, active.stream.error)
                else:
                    self._decoding.append(active)
        return [(active, frame) for active, frame in zip(stepping, frames, strict=True) if frame is not None]

    @staticmethod
    def _fail(rows: list[_Active], error: BaseException) -> None:
        """Mark the requests of `rows` failed; `_release` ends them."""
        for active in rows:
            active.sequence.done = True
            active.stream.error = error

    def _speak(self, frames: list[tuple[_Active, torch.Tensor]]) -> None:
        """Decode this turn's frames to audio in one Mimi step and hand each to its request.

        Every request with a Mimi row makes a frame each turn until it ends, so every row in
        use advances together; a request gets a fresh row at its first frame, the lowest free
        one, and the step decodes the rows up to the highest in use only.
        """
        for active, _ in frames:
            if active.audio_row is None:
                active.audio_row = min(self._free_audio_rows)
                self._free_audio_rows.remove(active.audio_row)
                self._audio.reset([active.audio_row])
        rows = 1 + max(active.audio_row for active, _ in frames)
        codes = torch.zeros(rows, frames[0][1].shape[0], 1, dtype=torch.long, device=frames[0][1].device)
        for active, frame in frames:
            codes[active.audio_row, :, 0] = frame
        try:
            with torch.inference_mode():
                audio = self._audio.step(codes)[:, 0].float().cpu()
        except Exception as error:  # noqa: BLE001 -- whatever it is, it fails these requests only
            for active, _ in frames:
                active.sequence.done = True
                active.stream.error = error
            return
        now = time.monotonic()
        with self._lock:
            stats = self._stats
            stats.steps.append((now, len(frames)))
            while stats.steps[0][0] < now - STATS_WINDOW_S:
                stats.steps.popleft()
            stats.frames += len(frames)
            stats.audio_seconds += len(frames) * audio.shape[-1] / self._generator.sample_rate
            for active, _ in frames:
                if active.stream.first_audio is None:
                    stats.first_audio.append(now - active.stream.submitted)
        for active, _ in frames:
            active.stream.put(audio[active.audio_row].clone())

    def _release(self) -> None:
        """End the finished rows and pack the others into rows 0 .. n-1, the prefilling ones above."""
        for active in self._decoding:
            if active.sequence.done:
                self._end(active.stream, active.stream.error)
                if active.audio_row is not None:
                    self._free_audio_rows.append(active.audio_row)
        by_sequence = {id(active.sequence): active for active in self._decoding}
        packed = self._batch.pack([active.sequence for active in self._decoding])
        self._decoding = [by_sequence[id(sequence)] for sequence in packed]
        # Rows only ever free up below a prompt being prefilled, so each moves down, in order,
        # into a row that is free by then.
        for row, active in enumerate(self._prefilling, start=len(self._decoding)):
            if active.sequence.row != row:
                self._batch.move(active.sequence, row)

    def _end(self, stream: _Stream, error: BaseException | None = None) -> None:
        """Release a request that held a row (or was admitted): finished, failed or cancelled.

        Its place is free before its consumer hears of the end, so that it can submit again.
        """
        with self._lock:
            self._pending -= 1
            if stream.cancelled:
                self._stats.cancelled += 1
            elif error is not None:
                self._stats.failed += 1
            else:
                self._stats.finished += 1
            self._lock.notify_all()
        stream.finish(error)

    def _cancelled(self, stream: _Stream) -> None:
        """A handle was cancelled: a waiting request leaves the queue now, a running one at the next turn."""
        with self._lock:
            if stream in self._queue:
                self._queue.remove(stream)
                self._pending -= 1
                self._stats.cancelled += 1
            self._lock.notify_all()

    def _fail_all(self, error: BaseException) -> None:
        running = [*self._decoding, *self._prefilling]
        self._decoding, self._prefilling = [], []
        self._free_audio_rows = list(range(self.max_batch))
        for active in running:
            self._end(active.stream, error)


def _quantile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
