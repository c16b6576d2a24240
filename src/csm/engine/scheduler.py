"""The engine's decisions: who gets a place, who waits, which rows step, prefill or wait.

All of it is bookkeeping under one lock, no torch work; the runner (`csm.engine.runner`) asks
and does what is decided.
- **Places**: the engine has `max_batch + max_queue`; a request takes one when submitted (or
  uses its `Admission`'s), and only then may QueueFullError be raised. It gives it back at its
  end, before its reader hears of the end, so that the reader can submit again.
- **Waiting**: a submitted request is `preparing` (checked and made into a prompt off the
  worker), then `queue`d until a row is free; each turn admits as many as rows are free.
- **Rows**: a request in a row is `decoding` (rows 0 .. n-1, in order, stepped together),
  `prefilling` (the rows above, in order, fed a chunk of prompt at a time, a chunk's worth of
  positions per turn in all) or `parked`: held back in no row while it is `max_ahead` samples
  ahead of its reader, back once the reader is halfway there, cancelled with
  ClientTimeoutError after `client_timeout_s` with the reader reading nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from csm.batching import PREFILL_CHUNK, Prompt, Sampling, Utterance
from csm.engine.requests import (
    Admission,
    ClientTimeoutError,
    EngineClosedError,
    Place,
    QueueFullError,
    Request,
    Stream,
    engine_failed,
)
from csm.mimi.codec import RowState

logger = logging.getLogger("csm.engine")

# Frames per second and time to first audio are reported over this recent window.
STATS_WINDOW_S = 10.0
STATS_REQUESTS = 100


@dataclass
class Running:
    """A request in a row: its stream, its utterance, its row of the audio decoder once it
    speaks, and, while it waits for its reader, its parked cache and audio state."""

    stream: Stream
    utterance: Utterance
    audio_row: int | None = None
    error: BaseException | None = None
    parked: tuple[torch.Tensor, RowState] | None = None
    parked_since: float = 0.0


@dataclass
class Stats:
    frames: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    rejected: int = 0
    audio_seconds: float = 0.0
    steps: deque = field(default_factory=deque)  # (time, frames) of recent steps
    first_audio: deque = field(default_factory=lambda: deque(maxlen=STATS_REQUESTS))


class Scheduler:
    """Places, waiting requests and rows of an engine of `max_batch` rows and `max_queue` waiting;
    a request runs at most `max_ahead` samples (at `sample_rate`) ahead of its reader."""

    def __init__(self, max_batch: int, max_queue: int, max_ahead: int, client_timeout_s: float, sample_rate: int):
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_ahead = max_ahead
        self.client_timeout_s = client_timeout_s
        self.sample_rate = sample_rate
        self.failure: BaseException | None = None  # why the worker died, if it did
        self._lock = threading.Condition()
        self._preparing: set[Stream] = set()  # submitted, being checked and made into prompts
        self._queue: deque[Stream] = deque()  # ready, waiting for a row
        self._places = 0  # places held: by waiting and running requests and by admissions
        self._in_rows = 0  # requests in rows, decoding, prefilling or parked
        self._closed = False
        self._stats = Stats()
        self._started = time.monotonic()
        # Only the worker touches these.
        self.decoding: list[Running] = []  # in rows 0 .. n-1, in order
        self.prefilling: list[Running] = []  # in rows n, n+1, ..., in order
        self.parked: list[Running] = []  # waiting for their readers, in no row

    # Places and the waiting requests, from any thread.

    def reserve(self) -> Admission:
        with self._lock:
            self._check_open()
            return Admission(self, self._take_place(), self._free)

    def enter(self, request: Request, admission: Admission | None) -> Stream:
        """A stream for a submitted request, in a place of its own or its admission's, being prepared."""
        with self._lock:
            self._check_open()
            if admission is None:
                place = self._take_place()
            elif admission._owner is not self:  # noqa: SLF001 -- the scheduler that made it
                raise ValueError("this admission belongs to another engine")
            elif not admission.held:
                raise RuntimeError("this admission was released: reserve another")
            else:
                place = None
            stream = Stream(request, place, admission, self._cancelled, self._wake)
            self._preparing.add(stream)
        return stream

    def prepared(
        self, stream: Stream, prompt: Prompt | None, sampling: Sampling | None, error: BaseException | None
    ) -> None:
        """A request was checked and made into a prompt (or failed to be, with `error`): it waits for a row."""
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

    def close(self) -> bool:
        """Stop admitting and wake the worker to stop; False if closed already."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            self._lock.notify_all()
        return True

    def fail_waiting(self, error: Callable[[], BaseException]) -> None:
        """End every request not yet in a row with a fresh `error()`."""
        with self._lock:
            waiting = [*self._preparing, *self._queue]
            self._preparing, self._queue = set(), deque()
            for stream in waiting:
                self._free_place_locked(stream)
        for stream in waiting:
            stream.finish(error())

    def end(self, stream: Stream, error: BaseException | None = None) -> None:
        """Release a request that held a row (or was admitted): finished, failed or cancelled.

        Its place is free before its consumer hears of the end, so that it can submit again.
        """
        with self._lock:
            self._in_rows -= 1
            self._count(stream, error)
            self._free_place_locked(stream)
        stream.finish(error)

    def died(self, error: BaseException) -> list[Running]:
        """The worker died of `error`: every later call fails; the requests that were in rows."""
        with self._lock:
            self.failure = error
            self._in_rows = 0
            self._lock.notify_all()
        running = [*self.decoding, *self.prefilling, *self.parked]
        self.decoding, self.prefilling, self.parked = [], [], []
        return running

    def _check_open(self) -> None:
        if self.failure is not None:
            raise engine_failed(self.failure)
        if self._closed:
            raise EngineClosedError("the engine is closed")

    def _take_place(self) -> Place:
        if self._places >= self.max_batch + self.max_queue:
            self._stats.rejected += 1
            raise QueueFullError(
                f"the engine is full: {self.max_batch} rows and {self.max_queue} queue places taken; retry later"
            )
        self._places += 1
        return Place()

    def _free(self, place: Place | None) -> None:
        with self._lock:
            if place is not None and place.held:
                place.held = False
                self._places -= 1

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _cancelled(self, stream: Stream) -> None:
        """A handle was cancelled: a waiting request leaves now, a running one at the next turn."""
        with self._lock:
            if stream in self._preparing or stream in self._queue:
                self._preparing.discard(stream)
                if stream in self._queue:
                    self._queue.remove(stream)
                self._count(stream, None)
                self._free_place_locked(stream)
            self._lock.notify_all()

    def _free_place_locked(self, stream: Stream) -> None:
        if stream.place is not None and stream.place.held:
            stream.place.held = False
            self._places -= 1
        self._lock.notify_all()

    def _count(self, stream: Stream, error: BaseException | None) -> None:
        if isinstance(error, ClientTimeoutError):
            self._stats.timed_out += 1
        elif stream.cancelled:
            self._stats.cancelled += 1
        elif error is not None:
            self._stats.failed += 1
        else:
            self._stats.finished += 1

    # Figures.

    def record(self, frames: list[Running], samples: int) -> None:
        """A Mimi step decoded a frame of `samples` for each of `frames`' requests."""
        now = time.monotonic()
        with self._lock:
            stats = self._stats
            stats.steps.append((now, len(frames)))
            while stats.steps[0][0] < now - STATS_WINDOW_S:
                stats.steps.popleft()
            stats.frames += len(frames)
            stats.audio_seconds += len(frames) * samples / self.sample_rate
            for running in frames:
                if running.stream.first_audio is None:
                    stats.first_audio.append(now - running.stream.submitted)

    def stats(self) -> dict[str, float | int]:
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
                "active": self._in_rows,
                "waiting_for_readers": len(self.parked),
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

    # The worker's turn: what comes in, which rows leave, wait or come back.

    def next_turn(self) -> list[Stream] | None:
        """Wait until there is work; then the waiting requests that rows are free for, now
        counted as running (None once the engine is closed)."""
        with self._lock:
            while not (
                self._closed
                or (self._queue and self._in_rows < self.max_batch)
                or self.decoding
                or self.prefilling
                or self._due()
            ):
                self._lock.wait(timeout=self._next_timeout())
            if self._closed:
                return None
            free = self.max_batch - self._in_rows
            incoming = [self._queue.popleft() for _ in range(min(free, len(self._queue)))]
            self._in_rows += len(incoming)
        return incoming

    @property
    def next_row(self) -> int:
        """The row a request admitted now takes: above the decoding and prefilling ones."""
        return len(self.decoding) + len(self.prefilling)

    def admitted(self, stream: Stream, utterance: Utterance) -> None:
        """A request started in `next_row`: its prompt is prefilled from the next turn on."""
        self.prefilling.append(Running(stream, utterance))

    def drop_cancelled(self) -> None:
        """Rows whose stream ended (cancelled): decoding ones finish at the next packing, the others now."""
        for running in self.decoding:
            if running.stream.finished:
                running.utterance.done = True
        for running in [running for running in [*self.prefilling, *self.parked] if running.stream.finished]:
            (self.prefilling if running in self.prefilling else self.parked).remove(running)
            self.end(running.stream)

    def too_far_ahead(self) -> list[Running]:
        """Decoding rows whose reader left more than `max_ahead` unread: the runner sets them aside."""
        return [
            running
            for running in self.decoding
            if not running.utterance.done and running.stream.unread > self.max_ahead
        ]

    def park(self, running: Running) -> None:
        """`running` was set aside: it waits, and leaves the decoding rows at the next packing,
        until its reader is halfway back."""
        running.parked_since = time.monotonic()
        running.stream.resume_below = self.max_ahead // 2
        self.parked.append(running)

    def time_out(self) -> None:
        """Cancel the parked rows whose reader read nothing for `client_timeout_s`."""
        now = time.monotonic()
        for running in [running for running in self.parked if self._idle(running, now) > self.client_timeout_s]:
            self.parked.remove(running)
            ahead = running.stream.unread / self.sample_rate
            logger.warning(
                "cancelled a request %.1f s of audio ahead of its reader, which read nothing for %g s",
                ahead,
                self.client_timeout_s,
            )
            error = ClientTimeoutError(
                f"the reader fell {ahead:.1f} s of audio behind and did not catch up within "
                f"{self.client_timeout_s:g} s; the request was cancelled"
            )
            self.end(running.stream, error)

    def finish_done(self) -> list[Running]:
        """End the requests of the decoding rows that are done (they leave at the packing)."""
        done = [running for running in self.decoding if running.utterance.done]
        for running in done:
            self.end(running.stream, running.error)
        return done

    def leaving(self) -> list[Utterance]:
        """The decoding utterances set aside for their readers: the packing takes them out."""
        return [running.utterance for running in self.decoding if running.parked is not None]

    def packed(self, utterances: list[Utterance]) -> None:
        """The decoding rows are now these utterances' (rows 0 .. n-1, in order)."""
        by_utterance = {id(running.utterance): running for running in self.decoding}
        self.decoding = [by_utterance[id(utterance)] for utterance in utterances]

    def caught_up(self) -> list[Running]:
        """Parked rows whose reader is back below half the bound: they come back."""
        return [running for running in self.parked if running.stream.unread <= running.stream.resume_below]

    def resume(self, running: Running) -> Running | None:
        """Put a parked request back, in the row above the decoding ones; the prompt being
        prefilled there (if any) makes way, to the top row, and is returned."""
        self.parked.remove(running)
        self.decoding.append(running)  # first: should what follows fail, it fails with the others
        running.stream.resume_below = None
        if not self.prefilling:
            return None
        self.prefilling.append(self.prefilling.pop(0))
        return self.prefilling[-1]

    def to_prefill(self) -> Iterator[Running]:
        """The prompts being prefilled that get their next chunk this turn, in order, until a
        chunk's worth of positions went in: a burst of short prompts starts together, while a
        long one still stalls the others for about one chunk. The caller stops early at a prompt
        that is not all in (the rows above it would not be contiguous)."""
        fed = 0
        for running in list(self.prefilling):
            if fed >= PREFILL_CHUNK:
                return
            start = running.utterance.prefilled
            yield running
            fed += running.utterance.prefilled - start

    def spoke(self, stepping: list[Running], frames: list[torch.Tensor | None]) -> None:
        """After a depth-decoder pass: a prompt whose first frame is out decodes from now on
        (one that ended at once, at the end of speech or failed, ends)."""
        for running, frame in zip(stepping, frames, strict=True):
            running.error = running.error or running.utterance.error  # non-finite logits fail this one only
            if running in self.prefilling:
                self.prefilling.remove(running)
                if running.utterance.done and frame is None:
                    self.end(running.stream, running.error)
                else:
                    self.decoding.append(running)

    def drop(self, running: Running, error: BaseException) -> None:
        """A prompt being prefilled failed: it ends with `error`."""
        self.prefilling.remove(running)
        self.end(running.stream, error)

    def end_running(self, error: BaseException) -> None:
        """End every request in a row with `error` (a turn failed)."""
        # A row being parked is in the decoding list and the parked one until the turn packs it.
        running = list({id(item): item for item in [*self.decoding, *self.prefilling, *self.parked]}.values())
        self.decoding, self.prefilling, self.parked = [], [], []
        for item in running:
            self.end(item.stream, error)

    def _due(self) -> bool:
        """A parked request whose reader caught up, or whose time ran out."""
        now = time.monotonic()
        return any(
            running.stream.unread <= running.stream.resume_below or self._idle(running, now) > self.client_timeout_s
            for running in self.parked
        )

    def _next_timeout(self) -> float | None:
        if not self.parked:
            return None
        now = time.monotonic()
        idle = max(self._idle(running, now) for running in self.parked)
        return max(0.0, self.client_timeout_s - idle) + 0.01

    @staticmethod
    def _idle(running: Running, now: float) -> float:
        """How long a parked request has waited with its reader reading nothing."""
        return now - max(running.parked_since, running.stream.last_read)


def _quantile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
