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
from its first frame to its end, but while it waits for its reader) for the requests'
handles, and frees the rows of finished, failed and cancelled requests, moving the last
decoding row into each hole so that one step covers them all. A request computes exactly
what `Generator.generate` computes for it alone: see `csm.batching`.

Requests come from any thread or asyncio loop. `submit` returns at once: a request is checked
and its prompt made (new context audio encoded) on a thread of its own, never on the worker;
beyond the rows requests wait in a bounded queue, and `reserve` holds a place for a caller that
submits several in turn. A request never runs more than `max_ahead_s` of audio ahead of its
reader: its row waits, and is cancelled if the reader stays away. If the worker ever dies,
every request fails at once with the reason (`Engine.failure`).
Streamed chunks are not watermarked, so that a server can watermark them as it designs;
`Handle.result` gives the whole clip, watermarked.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import torch

from csm import batching
from csm.errors import CSMError, GenerationError
from csm.generator import Generator, Segment, check_arguments
from csm.mimi.codec import RowState
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

logger = logging.getLogger("csm.engine")

# Frames per second and time to first audio are reported over this recent window.
STATS_WINDOW_S = 10.0
STATS_REQUESTS = 100


class QueueFullError(CSMError):
    """The engine's queue of waiting requests is full; try again later."""


class EngineClosedError(CSMError):
    """The engine was closed before the request could finish."""


class EngineFailedError(CSMError):
    """The engine's worker died: nothing it held or will be given can finish (see `Engine.failure`)."""


class ClientTimeoutError(CSMError):
    """The request's reader fell behind for longer than the engine's `client_timeout_s`."""


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


class _Place:
    """One of the engine's `max_batch + max_queue` places, held by a request or an `Admission`."""

    held = True


class Admission:
    """A place in the engine, held for utterances submitted one after another (`Engine.reserve`).

    While it is held, `Engine.submit(request, admission)` never answers QueueFullError.
    `release` (or leaving its `with` block, or dropping it) gives the place back.
    """

    def __init__(self, engine: Engine, place: _Place):
        self._engine = engine
        self._place = place
        weakref.finalize(self, engine._free, place)

    @property
    def held(self) -> bool:
        return self._place.held

    def release(self) -> None:
        """Give the place back (again: nothing happens)."""
        self._engine._free(self._place)

    def __enter__(self) -> Admission:  # noqa: PYI034 -- typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


class _Stream:
    """A request's chunks between the worker (producer) and its handle (consumer)."""

    def __init__(self, request: Request, engine: Engine, place: _Place | None, admission: Admission | None):
        self.request = request
        self.engine = engine
        self.place = place  # its own place, None when an admission's holds it
        self.admission = admission  # kept alive while the request runs
        self.submitted = time.monotonic()
        self.first_audio: float | None = None
        self.prompt: batching.Prompt | None = None  # made off the worker, before it is queued
        self.sampling: batching.Sampling | None = None
        self.checked = False
        self.cancelled = False
        self.finished = False
        self.error: BaseException | None = None
        self.unread = 0  # samples put and not yet read
        self.last_read = 0.0  # when the reader last took a chunk (time.monotonic)
        self.resume_below: int | None = None  # set while the worker holds the row back for its reader
        self._chunks: deque[torch.Tensor] = deque()
        self._ready = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event, Callable[[], bool]]] = []

    def put(self, chunk: torch.Tensor) -> None:
        with self._ready:
            if self.finished:
                return
            self._chunks.append(chunk)
            self.unread += chunk.numel()
            if self.first_audio is None:
                self.first_audio = time.monotonic()
        self._notify()

    def mark_checked(self) -> None:
        with self._ready:
            self.checked = True
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
            self.unread = 0
        if self.finish():
            self.engine._cancelled(self)

    def next(self, block: bool) -> torch.Tensor | None:
        """The next chunk; None when there is none yet (block=False). Raises at the end."""
        with self._ready:
            while block and not self._chunks and not self.finished:
                self._ready.wait()
            if self._chunks:
                chunk = self._chunks.popleft()
                self.unread -= chunk.numel()
                self.last_read = time.monotonic()
                caught_up = self.resume_below is not None and self.unread <= self.resume_below
            elif self.finished:
                if self.error is not None and not self.cancelled:
                    raise self.error
                raise StopIteration
            else:
                return None
        if caught_up:
            self.engine._wake()
        return chunk

    def raise_unchecked(self) -> bool:
        """True once checked or ended; raises the error of a request that failed before."""
        with self._ready:
            if self.finished and not self.checked and self.error is not None:
                raise self.error
            return self.checked or self.finished

    def wait_async(self, loop: asyncio.AbstractEventLoop, ready: Callable[[], bool] | None = None) -> asyncio.Event:
        """An event of `loop` set when `ready()` (default: a chunk or the end is there) may
        have become true (set now if it is)."""
        ready = ready or (lambda: bool(self._chunks) or self.finished)
        event = asyncio.Event()
        with self._ready:
            if ready():
                event.set()
            else:
                self._waiters.append((loop, event, ready))
        return event

    def _notify(self) -> None:
        with self._ready:
            self._ready.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, event, _ in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop closed (checking first would race with it): no one waits there
                pass


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

    async def checked(self) -> None:
        """Return once the request was checked and its prompt made, before any audio; raise
        its ValueError if it is bad (or the engine's error if it ended before that)."""
        loop = asyncio.get_running_loop()
        while not self._stream.raise_unchecked():
            await self._stream.wait_async(loop, lambda: self._stream.checked or self._stream.finished).wait()

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
    """A request in a row: its stream, its utterance, its row of the audio decoder once it speaks,
    and, while it waits for its reader, its parked cache and audio state."""

    stream: _Stream
    utterance: batching.Utterance
    audio_row: int | None = None
    error: BaseException | None = None
    parked: tuple[torch.Tensor, RowState] | None = None
    parked_since: float = 0.0


@dataclass
class _Stats:
    frames: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    rejected: int = 0
    audio_seconds: float = 0.0
    steps: deque = field(default_factory=deque)  # (time, frames) of recent steps
    first_audio: deque = field(default_factory=lambda: deque(maxlen=STATS_REQUESTS))


class Engine:
    """Serves requests with `generator`'s model, `max_batch` rows at once, `max_queue` waiting.

    A request runs at most `max_ahead_s` of audio ahead of its reader: past that its row waits
    (it makes no frames) until the reader is halfway back; once it has waited `client_timeout_s`
    with its reader reading nothing, it is cancelled and its handle raises ClientTimeoutError.
    The engine owns the model until `close` (the generator refuses to generate meanwhile).
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
        self.failure: BaseException | None = None  # why the worker died, if it did
        self._generator = generator
        self._mimi = generator.mimi
        self._max_ahead = round(max_ahead_s * generator.sample_rate)  # samples
        self._free_audio_rows = list(range(max_batch))
        self._lock = threading.Condition()
        self._preparer = SerialQueue("csm-engine-prepare")
        self._preparing: set[_Stream] = set()  # submitted, being checked and made into prompts
        self._queue: deque[_Stream] = deque()  # ready, waiting for a row
        self._places = 0  # places held: by waiting and running requests and by admissions
        self._running = 0  # requests in rows, decoding, prefilling or parked
        self._closed = False
        self._stats = _Stats()
        self._started = time.monotonic()
        # Only the worker touches these.
        self._decoding: list[_Active] = []  # in rows 0 .. n-1, in order
        self._prefilling: list[_Active] = []  # in rows n, n+1, ..., in order
        self._parked: list[_Active] = []  # waiting for their readers, in no row
        started: Future[None] = Future()
        self._thread = threading.Thread(target=self._work, args=(started,), name="csm-engine", daemon=True)
        self._thread.start()
        try:
            started.result()
        except BaseException:
            generator.release(self)
            raise

    def __enter__(self) -> Engine:  # noqa: PYI034 -- typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def reserve(self) -> Admission:
        """Hold a place for a request that will submit several utterances one after another.

        Raises QueueFullError when every place is taken, EngineClosedError when closed and
        EngineFailedError when the worker died.
        """
        with self._lock:
            self._check_open()
            return Admission(self, self._take_place())

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
        check_arguments(
            request.text,
            request.speaker,
            request.context,
            request.max_audio_length_ms,
            request.temperature,
            request.topk,
            request.seed,
        )
        with self._lock:
            self._check_open()
            if admission is None:
                stream = _Stream(request, self, self._take_place(), None)
            elif admission._engine is not self:
                raise ValueError("this admission belongs to another engine")
            elif not admission.held:
                raise RuntimeError("this admission was released: reserve another")
            else:
                stream = _Stream(request, self, None, admission)
            self._preparing.add(stream)
        self._preparer.submit(self._prepare, stream)
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
                "queue_length": len(self._preparing) + len(self._queue),
                "active": self._running,
                "waiting_for_readers": len(self._parked),
                "max_batch": self.max_batch,
                "max_queue": self.max_queue,
                "frames_generated": stats.frames,
                "frames_per_second": recent / window if window > 0 else 0.0,
                "audio_seconds": stats.audio_seconds,
                "requests_finished": stats.finished,
                "requests_failed": stats.failed,
                "requests_cancelled": stats.cancelled,
                "requests_timed_out": stats.timed_out,
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
            self._lock.notify_all()
        self._fail_waiting(lambda: EngineClosedError("the engine was closed before this request started"))
        self._preparer.join()  # no prompt is being made with the generator once it is back
        if threading.current_thread() is not self._thread:
            self._thread.join()
        self._generator.release(self)

    # Places and the waiting requests, from any thread.

    def _check_open(self) -> None:
        if self.failure is not None:
            raise _failed(self.failure)
        if self._closed:
            raise EngineClosedError("the engine is closed")

    def _take_place(self) -> _Place:
        if self._places >= self.max_batch + self.max_queue:
            self._stats.rejected += 1
            raise QueueFullError(
                f"the engine is full: {self.max_batch} rows and {self.max_queue} queue places taken; retry later"
            )
        self._places += 1
        return _Place()

    def _free(self, place: _Place | None) -> None:
        with self._lock:
            if place is not None and place.held:
                place.held = False
                self._places -= 1

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _prepare(self, stream: _Stream) -> None:
        """Check a request and make its prompt (encoding new context audio), on the preparer's
        thread, then queue it for a row."""
        request, generator = stream.request, self._generator
        error = None
        try:
            if stream.finished:
                return
            generator.check_request(
                request.text,
                request.speaker,
                request.context,
                request.max_audio_length_ms,
                request.temperature,
                request.topk,
                request.seed,
            )
            prompt = generator.prompt(request.text, request.speaker, request.context)
            sampling = generator.sampling(request.max_audio_length_ms, request.temperature, request.topk, request.seed)
            if request.seed is None:
                # Its own generator, so that a request never draws from another's noise.
                rng = torch.Generator(generator.device)
                rng.seed()
                sampling = replace(sampling, generator=rng)
        except Exception as caught:  # noqa: BLE001 -- whatever it is, it fails this request only
            error = caught
        with self._lock:
            if stream not in self._preparing:  # cancelled, or the engine closed or failed meanwhile
                return
            self._preparing.remove(stream)
            if error is None:
                stream.prompt, stream.sampling = prompt, sampling
                self._queue.append(stream)
                self._lock.notify_all()
            else:
                self._count(stream, error)
                self._free_place_locked(stream)
        if error is None:
            stream.mark_checked()
        else:
            stream.finish(error)

    def _cancelled(self, stream: _Stream) -> None:
        """A handle was cancelled: a waiting request leaves now, a running one at the next turn."""
        with self._lock:
            if stream in self._preparing or stream in self._queue:
                self._preparing.discard(stream)
                if stream in self._queue:
                    self._queue.remove(stream)
                self._count(stream, None)
                self._free_place_locked(stream)
            self._lock.notify_all()

    def _fail_waiting(self, error: Callable[[], BaseException]) -> None:
        """End every request not yet in a row with a fresh `error()`."""
        with self._lock:
            waiting = [*self._preparing, *self._queue]
            self._preparing, self._queue = set(), deque()
            for stream in waiting:
                self._free_place_locked(stream)
        for stream in waiting:
            stream.finish(error())

    def _free_place_locked(self, stream: _Stream) -> None:
        if stream.place is not None and stream.place.held:
            stream.place.held = False
            self._places -= 1
        self._lock.notify_all()

    def _count(self, stream: _Stream, error: BaseException | None) -> None:
        if isinstance(error, ClientTimeoutError):
            self._stats.timed_out += 1
        elif stream.cancelled:
            self._stats.cancelled += 1
        elif error is not None:
            self._stats.failed += 1
        else:
            self._stats.finished += 1

    # The worker thread.

    def _work(self, started: Future[None]) -> None:
        # The caches and Mimi's stream state are made here, so that this thread is the only
        # one whose torch work starts OpenMP workers while the engine runs (see csm.threads).
        try:
            self._audio = self._mimi.decode_stream(self.max_batch)
            self._batch = batching.CacheRows(self._generator.model, self._generator.prefix_cache)
            self._generator.model.setup_caches(self.max_batch)
        except BaseException as error:  # noqa: BLE001 -- raised by the constructor
            started.set_exception(error)
            return
        started.set_result(None)
        try:
            self._serve()
            self._fail_running(EngineClosedError("the engine was closed before this request finished"))
        except BaseException as error:  # noqa: BLE001 -- the worker dies: say why, to everyone
            self._die(error)

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not (
                    self._closed
                    or (self._queue and self._running < self.max_batch)
                    or self._decoding
                    or self._prefilling
                    or self._due()
                ):
                    self._lock.wait(timeout=self._next_timeout())
                if self._closed:
                    return
                # Every ready request that a row is free for.
                free = self.max_batch - self._running
                incoming = [self._queue.popleft() for _ in range(min(free, len(self._queue)))]
                self._running += len(incoming)
            try:
                self._turn(incoming)
            except Exception as error:  # noqa: BLE001 -- a bug or an exhausted device: fail what runs, keep serving
                logger.exception("an engine turn failed; its requests fail with it")
                self._fail_running(error)

    def _die(self, error: BaseException) -> None:
        """The worker cannot go on: every request, waiting or running, and every later call fails."""
        with self._lock:
            self.failure = error
            self._running = 0
            self._lock.notify_all()
        logger.critical("the engine's worker died; every request fails from now on", exc_info=error)
        running = [*self._decoding, *self._prefilling, *self._parked]
        self._decoding, self._prefilling, self._parked = [], [], []
        self._fail_waiting(lambda: _failed(error))
        for active in running:
            try:
                active.stream.finish(_failed(error))
            except BaseException:  # noqa: BLE001, S110 -- the others must hear of it all the same
                pass

    def _turn(self, incoming: list[_Stream]) -> None:
        """One turn: admit, hold back or time out rows ahead of their readers, one batched frame,
        prefill chunks, audio out, rows freed."""
        for stream in incoming:
            self._admit(stream)
        self._drop_cancelled()
        self._hold_back()
        self._release()
        self._resume()
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
            start = active.utterance.prefilled
            state = self._feed(active)
            if state is None:  # not all in yet, or failed: the rows above are not contiguous
                break
            fed += active.utterance.prefilled - start
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
        try:
            utterance = self._batch.start(stream.prompt, stream.sampling, len(self._decoding) + len(self._prefilling))
        except Exception as error:  # noqa: BLE001 -- whatever it is, it fails this request only
            self._end(stream, error)
            return
        self._prefilling.append(_Active(stream, utterance))

    def _drop_cancelled(self) -> None:
        for active in self._decoding:
            if active.stream.finished:
                active.utterance.done = True
        for active in [active for active in [*self._prefilling, *self._parked] if active.stream.finished]:
            (self._prefilling if active in self._prefilling else self._parked).remove(active)
            self._end(active.stream)

    # Backpressure: a request whose unread audio exceeds `max_ahead_s` leaves its cache row (its
    # keys and values are copied aside, as is its Mimi state) so that the stepping rows stay
    # contiguous; it comes back, above the decoding rows, once its reader is halfway back.

    def _hold_back(self) -> None:
        now = time.monotonic()
        for active in self._decoding:
            stream, utterance = active.stream, active.utterance
            if utterance.done or stream.unread <= self._max_ahead:
                continue
            active.parked = (
                self._batch.model.cache_prefix(utterance.row, utterance.written),
                self._audio.save(active.audio_row),
            )
            active.parked_since = now
            self._free_audio_rows.append(active.audio_row)
            active.audio_row = None
            stream.resume_below = self._max_ahead // 2
            self._parked.append(active)
        for active in [active for active in self._parked if self._idle(active, now) > self.client_timeout_s]:
            self._parked.remove(active)
            ahead = active.stream.unread / self._generator.sample_rate
            logger.warning(
                "cancelled a request %.1f s of audio ahead of its reader, which read nothing for %g s",
                ahead,
                self.client_timeout_s,
            )
            error = ClientTimeoutError(
                f"the reader fell {ahead:.1f} s of audio behind and did not catch up within "
                f"{self.client_timeout_s:g} s; the request was cancelled"
            )
            self._end(active.stream, error)

    def _resume(self) -> None:
        for active in [active for active in self._parked if active.stream.unread <= active.stream.resume_below]:
            self._parked.remove(active)
            row = len(self._decoding)
            self._decoding.append(active)  # first: should what follows fail, it fails with the others
            if self._prefilling:  # the first prompt being prefilled makes way, to the top
                self._batch.move(self._prefilling[0].utterance, row + len(self._prefilling))
                self._prefilling.append(self._prefilling.pop(0))
            cache, audio = active.parked
            self._batch.model.load_cache_prefix(row, cache)
            active.utterance.row = row
            active.audio_row = min(self._free_audio_rows)
            self._free_audio_rows.remove(active.audio_row)
            self._audio.restore(active.audio_row, audio)
            active.parked, active.stream.resume_below = None, None

    def _due(self) -> bool:
        """A parked request whose reader caught up, or whose time ran out."""
        now = time.monotonic()
        return any(
            active.stream.unread <= active.stream.resume_below or self._idle(active, now) > self.client_timeout_s
            for active in self._parked
        )

    def _next_timeout(self) -> float | None:
        if not self._parked:
            return None
        now = time.monotonic()
        idle = max(self._idle(active, now) for active in self._parked)
        return max(0.0, self.client_timeout_s - idle) + 0.01

    @staticmethod
    def _idle(active: _Active, now: float) -> float:
        """How long a parked request has waited with its reader reading nothing."""
        return now - max(active.parked_since, active.stream.last_read)

    # The frames.

    def _advance(self) -> tuple[list[_Active], list[torch.Tensor]]:
        """The decoding rows' backbone step: the rows and their states, or none if it failed."""
        if not self._decoding:
            return [], []
        try:
            states = self._batch.advance([active.utterance for active in self._decoding])
        except Exception as error:  # noqa: BLE001 -- whatever it is, it fails these requests only
            self._fail(self._decoding, error)
            return [], []
        return list(self._decoding), [states]

    def _feed(self, active: _Active) -> torch.Tensor | None:
        """The next chunk of a prompt being prefilled: the state its first frame follows, once all in."""
        try:
            return self._batch.feed(active.utterance)
        except Exception as error:  # noqa: BLE001 -- whatever it is, it fails this request only
            self._prefilling.remove(active)
            self._end(active.stream, error)
            return None

    def _sample(self, stepping: list[_Active], states: list[torch.Tensor]) -> list[tuple[_Active, torch.Tensor]]:
        """One depth-decoder pass for every row that stepped: their frames."""
        try:
            frames = self._batch.sample([active.utterance for active in stepping], torch.cat(states))
        except Exception as error:  # noqa: BLE001 -- whatever it is, it fails these requests only
            frames = [None] * len(stepping)
            self._fail(stepping, error)
        for active, frame in zip(stepping, frames, strict=True):
            active.error = active.error or active.utterance.error  # non-finite logits fail this one only
            if active in self._prefilling:
                # Its first frame is out, or it ended (end of speech at once, or a failure).
                self._prefilling.remove(active)
                if active.utterance.done and frame is None:
                    self._end(active.stream, active.error)
                else:
                    self._decoding.append(active)
        return [(active, frame) for active, frame in zip(stepping, frames, strict=True) if frame is not None]

    @staticmethod
    def _fail(rows: list[_Active], error: BaseException) -> None:
        """Mark the requests of `rows` failed; `_release` ends them."""
        for active in rows:
            active.utterance.done = True
            active.error = error

    def _speak(self, frames: list[tuple[_Active, torch.Tensor]]) -> None:
        """Decode this turn's frames to audio in one Mimi step and hand each to its request.

        Every request with a Mimi row makes a frame each turn until it ends or is parked, so
        every row in use advances together; a request gets a fresh row at its first frame, the
        lowest free one, and the step decodes the rows up to the highest in use only.
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
            self._fail([active for active, _ in frames], error)
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
        """End the finished rows, pack the others into rows 0 .. n-1 (the parked ones leave), and
        the prefilling ones above."""
        for active in self._decoding:
            if active.utterance.done:
                self._end(active.stream, active.error)
                if active.audio_row is not None:
                    self._free_audio_rows.append(active.audio_row)
        by_utterance = {id(active.utterance): active for active in self._decoding}
        leaving = [active.utterance for active in self._decoding if active.parked is not None]
        packed = self._batch.pack([active.utterance for active in self._decoding], leaving)
        self._decoding = [by_utterance[id(utterance)] for utterance in packed]
        # Rows only ever free up below a prompt being prefilled, so each moves down, in order,
        # into a row that is free by then.
        for row, active in enumerate(self._prefilling, start=len(self._decoding)):
            if active.utterance.row != row:
                self._batch.move(active.utterance, row)

    def _end(self, stream: _Stream, error: BaseException | None = None) -> None:
        """Release a request that held a row (or was admitted): finished, failed or cancelled.

        Its place is free before its consumer hears of the end, so that it can submit again.
        """
        with self._lock:
            self._running -= 1
            self._count(stream, error)
            self._free_place_locked(stream)
        stream.finish(error)

    def _fail_running(self, error: BaseException) -> None:
        # A row being parked is in the decoding list and the parked one until the turn packs it.
        running = list({id(active): active for active in [*self._decoding, *self._prefilling, *self._parked]}.values())
        self._decoding, self._prefilling, self._parked = [], [], []
        self._free_audio_rows = list(range(self.max_batch))
        for active in running:
            self._end(active.stream, error)


def _failed(reason: BaseException) -> EngineFailedError:
    error = EngineFailedError(f"the engine stopped: its worker died of {type(reason).__name__}: {reason}")
    error.__cause__ = reason
    return error


def _quantile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
