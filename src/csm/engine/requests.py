"""What a caller holds: a `Request`, the `Handle` its audio comes through, an `Admission`.

A request's chunks pass from the worker to its reader through a `Stream`, which any thread,
and any asyncio loop, may read. The scheduler is told of a cancelled stream, and of a reader
that caught up with a row held back for it, through the two callbacks a stream is made with.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from csm.batching import Prompt, Sampling
from csm.errors import CSMError
from csm.generator import Segment


class QueueFullError(CSMError):
    """The engine's queue of waiting requests is full; try again later."""


class EngineClosedError(CSMError):
    """The engine was closed before the request could finish."""


class EngineFailedError(CSMError):
    """The engine's worker died: nothing it held or will be given can finish (see `Engine.failure`)."""


class ClientTimeoutError(CSMError):
    """The request's reader fell behind for longer than the engine's `client_timeout_s`."""


def engine_failed(reason: BaseException) -> EngineFailedError:
    """The error of every request once the worker died of `reason`."""
    error = EngineFailedError(f"the engine stopped: its worker died of {type(reason).__name__}: {reason}")
    error.__cause__ = reason
    return error


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

    def arguments(self) -> tuple:
        """Its fields as the arguments of `Generator.generate` (and of its checks), in order."""
        return (self.text, self.speaker, self.context, self.max_audio_length_ms, self.temperature, self.topk, self.seed)


class Place:
    """One of the engine's `max_batch + max_queue` places, held by a request or an `Admission`."""

    held = True


class Admission:
    """A place in the engine, held for utterances submitted one after another (`Engine.reserve`).

    While it is held, `Engine.submit(request, admission)` never answers QueueFullError.
    `release` (or leaving its `with` block, or dropping it) gives the place back.
    """

    def __init__(self, owner: object, place: Place, free: Callable[[Place], None]):
        self._owner = owner  # the scheduler whose place it holds
        self._place = place
        self._free = free
        weakref.finalize(self, free, place)

    @property
    def held(self) -> bool:
        return self._place.held

    def release(self) -> None:
        """Give the place back (again: nothing happens)."""
        self._free(self._place)

    def __enter__(self) -> Admission:  # noqa: PYI034 -- typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


class Stream:
    """A request's chunks between the worker (producer) and its handle (consumer).

    `on_cancel(stream)` runs once when the reader cancels; `on_caught_up()` when it read its way
    back below `resume_below`, the unread samples at which a row held back for it goes on.
    """

    def __init__(
        self,
        request: Request,
        place: Place | None,
        admission: Admission | None,
        on_cancel: Callable[[Stream], None],
        on_caught_up: Callable[[], None],
    ):
        self.request = request
        self.place = place  # its own place, None when an admission's holds it
        self.admission = admission  # kept alive while the request runs
        self.submitted = time.monotonic()
        self.first_audio: float | None = None
        self.prompt: Prompt | None = None  # made off the worker, before it is queued
        self.sampling: Sampling | None = None
        self.checked = False
        self.cancelled = False
        self.finished = False
        self.error: BaseException | None = None
        self.unread = 0  # samples put and not yet read
        self.last_read = 0.0  # when the reader last took a chunk (time.monotonic)
        self.resume_below: int | None = None  # set while the worker holds the row back for its reader
        self._on_cancel = on_cancel
        self._on_caught_up = on_caught_up
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
            self._on_cancel(self)

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
            self._on_caught_up()
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

    def __init__(self, stream: Stream, watermark: Callable[[torch.Tensor], torch.Tensor]):
        self._stream = stream
        self._watermark = watermark
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
        return self._watermark(audio)
