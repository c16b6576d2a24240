"""The engine's worker: runs the scheduler's rows through the model and Mimi, and delivers audio.

One thread owns the generator's model while the engine runs. Each turn it takes what the
scheduler (`csm.engine.scheduler`) lets in and does what it decides: a new request starts in
the row above the others (its longest cached context prefix copied in); a row too far ahead of
its reader has its keys and values and its Mimi state copied aside, and a row that comes back
has them copied in; finished rows are freed, the last decoding row moving into each hole so
that one step covers them all. Then the decoding rows make one backbone step together, the
prompts being prefilled get their next chunks, one depth-decoder pass samples the frames of
both (a first frame costs a chunk of prefill, not a frame step of its own), and one streaming
Mimi step decodes every new frame for its request's handle.

An error in a step fails the requests of that step (the scheduler ends them) and the worker
serves on; anything else kills it, and then every request, waiting, running or later, fails
with EngineFailedError naming the reason.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future

import torch

from csm.batching import CacheRows
from csm.compiled import CompiledCSM
from csm.engine.requests import EngineClosedError, Stream, engine_failed
from csm.engine.scheduler import Running, Scheduler
from csm.generator import Generator

logger = logging.getLogger("csm.engine")


class Runner:
    """The worker thread of an engine: `generator`'s model in `scheduler.max_batch` cache rows.

    Returns once the caches are made and, for a compiled model, its graphs (or raises what made
    them fail)."""

    def __init__(self, generator: Generator, scheduler: Scheduler):
        self.scheduler = scheduler
        self._generator = generator
        self._free_audio_rows = list(range(scheduler.max_batch))
        started: Future[None] = Future()
        self._thread = threading.Thread(target=self._work, args=(started,), name="csm-engine", daemon=True)
        self._thread.start()
        started.result()

    def join(self) -> None:
        """Wait for the worker to stop (the scheduler was closed), unless called from it."""
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _work(self, started: Future[None]) -> None:
        # The caches and Mimi's stream state are made here, so that this thread is the only
        # one whose torch work starts OpenMP workers while the engine runs (see csm.threads).
        generator = self._generator
        try:
            self._audio = generator.mimi.decode_stream(self.scheduler.max_batch)
            self._rows = CacheRows(generator.model, generator.prefix_cache)
            generator.model.setup_caches(self.scheduler.max_batch)
            if isinstance(generator.model, CompiledCSM):
                # Every row count's graphs now, not in the middle of serving, where a first
                # compilation would hold up every row for as long as it takes.
                seconds = generator.model.warm_up()
                logger.info("compiled the frame step for 1 to %d rows in %.1f s", self.scheduler.max_batch, seconds)
        except BaseException as error:  # noqa: BLE001 -- raised by the constructor
            started.set_exception(error)
            return
        started.set_result(None)
        try:
            self._serve()
            self.scheduler.end_running(EngineClosedError("the engine was closed before this request finished"))
        except BaseException as error:  # noqa: BLE001 -- the worker dies: say why, to everyone
            self._die(error)

    def _serve(self) -> None:
        while (incoming := self.scheduler.next_turn()) is not None:
            try:
                self._turn(incoming)
            except Exception as error:  # a bug or an exhausted device: fail what runs, keep serving
                logger.exception("an engine turn failed; its requests fail with it")
                self._free_audio_rows = list(range(self.scheduler.max_batch))
                self.scheduler.end_running(error)

    def _die(self, error: BaseException) -> None:
        """The worker cannot go on: every request, waiting or running, and every later call fails."""
        running = self.scheduler.died(error)
        logger.critical("the engine's worker died; every request fails from now on", exc_info=error)
        self.scheduler.fail_waiting(lambda: engine_failed(error))
        for item in running:
            try:
                item.stream.finish(engine_failed(error))
            except BaseException:  # noqa: BLE001, S110 -- the others must hear of it all the same
                pass

    def _turn(self, incoming: list[Stream]) -> None:
        """One turn: admit, hold back or time out rows ahead of their readers, one batched frame,
        prefill chunks, audio out, rows freed."""
        scheduler = self.scheduler
        for stream in incoming:
            self._admit(stream)
        scheduler.drop_cancelled()
        for running in scheduler.too_far_ahead():
            self._park(running)
        scheduler.time_out()
        self._pack()
        for running in scheduler.caught_up():
            self._resume(running)
        stepping, states = self._advance()
        # A prompt that is all in joins the decoding rows' depth-decoder pass for its first
        # frame (its row is right above theirs), then decodes with them.
        for running in scheduler.to_prefill():
            state = self._feed(running)
            if state is None:  # not all in yet, or failed: the rows above are not contiguous
                break
            stepping.append(running)
            states.append(state[None])
        frames = self._sample(stepping, states) if stepping else []
        if frames:
            self._speak(frames)
        self._pack()

    def _admit(self, stream: Stream) -> None:
        if stream.cancelled:
            self.scheduler.end(stream)
            return
        try:
            utterance = self._rows.start(stream.prompt, stream.sampling, self.scheduler.next_row)
        except Exception as error:  # noqa: BLE001 -- whatever it is, it fails this request only
            self.scheduler.end(stream, error)
            return
        self.scheduler.admitted(stream, utterance)

    # Backpressure: a request whose reader fell behind leaves its cache row (its keys and values
    # are copied aside, as is its Mimi state) so that the stepping rows stay contiguous; it comes
    # back, above the decoding rows, when the scheduler says so.

    def _park(self, running: Running) -> None:
        utterance = running.utterance
        running.parked = (
            self._rows.model.cache_prefix(utterance.row, utterance.written),
            self._audio.save(running.audio_row),
        )
        self._free_audio_rows.append(running.audio_row)
        running.audio_row = None
        self.scheduler.park(running)

    def _resume(self, running: Running) -> None:
        row = len(self.scheduler.decoding)
        moved = self.scheduler.resume(running)
        if moved is not None:  # the prompt being prefilled in `row` makes way, to the top
            self._rows.move(moved.utterance, row + len(self.scheduler.prefilling))
        cache, audio = running.parked
        self._rows.model.load_cache_prefix(row, cache)
        running.utterance.row = row
        running.audio_row = self._take_audio_row()
        self._audio.restore(running.audio_row, audio)
        running.parked = None

    def _pack(self) -> None:
        """End the finished rows, pack the others into rows 0 .. n-1 (the parked ones leave), and
        the prefilling ones above."""
        scheduler = self.scheduler
        for running in scheduler.finish_done():
            if running.audio_row is not None:
                self._free_audio_rows.append(running.audio_row)
        decoding = [running.utterance for running in scheduler.decoding]
        scheduler.packed(self._rows.pack(decoding, scheduler.leaving()))
        # Rows only ever free up below a prompt being prefilled, so each moves down, in order,
        # into a row that is free by then.
        for row, running in enumerate(scheduler.prefilling, start=len(scheduler.decoding)):
            if running.utterance.row != row:
                self._rows.move(running.utterance, row)

    # The frames.

    def _advance(self) -> tuple[list[Running], list[torch.Tensor]]:
        """The decoding rows' backbone step: the rows and their states, or none if it failed."""
        decoding = list(self.scheduler.decoding)
        if not decoding:
            return [], []
        try:
            states = self._rows.advance([running.utterance for running in decoding])
        except Exception as error:  # noqa: BLE001 -- whatever it is, it fails these requests only
            _fail(decoding, error)
            return [], []
        return decoding, [states]

    def _feed(self, running: Running) -> torch.Tensor | None:
        """The next chunk of a prompt being prefilled: the state its first frame follows, once all in."""
        try:
            return self._rows.feed(running.utterance)
        except Exception as error:  # noqa: BLE001 -- whatever it is, it fails this request only
            self.scheduler.drop(running, error)
            return None

    def _sample(self, stepping: list[Running], states: list[torch.Tensor]) -> list[tuple[Running, torch.Tensor]]:
        """One depth-decoder pass for every row that stepped: their frames."""
        try:
            frames = self._rows.sample([running.utterance for running in stepping], torch.cat(states))
        except Exception as error:  # noqa: BLE001 -- whatever it is, it fails these requests only
            frames = [None] * len(stepping)
            _fail(stepping, error)
        self.scheduler.spoke(stepping, frames)
        return [(running, frame) for running, frame in zip(stepping, frames, strict=True) if frame is not None]

    def _speak(self, frames: list[tuple[Running, torch.Tensor]]) -> None:
        """Decode this turn's frames to audio in one Mimi step and hand each to its request.

        Every request with a Mimi row makes a frame each turn until it ends or is parked, so
        every row in use advances together; a request gets a fresh row at its first frame, the
        lowest free one, and the step decodes the rows up to the highest in use only.
        """
        for running, _ in frames:
            if running.audio_row is None:
                running.audio_row = self._take_audio_row()
                self._audio.reset([running.audio_row])
        rows = 1 + max(running.audio_row for running, _ in frames)
        codes = torch.zeros(rows, frames[0][1].shape[0], 1, dtype=torch.long, device=frames[0][1].device)
        for running, frame in frames:
            codes[running.audio_row, :, 0] = frame
        try:
            with torch.inference_mode():
                audio = self._audio.step(codes)[:, 0].float().cpu()
        except Exception as error:  # noqa: BLE001 -- whatever it is, it fails these requests only
            _fail([running for running, _ in frames], error)
            return
        self.scheduler.record([running for running, _ in frames], audio.shape[-1])
        for running, _ in frames:
            running.stream.put(audio[running.audio_row].clone())

    def _take_audio_row(self) -> int:
        row = min(self._free_audio_rows)
        self._free_audio_rows.remove(row)
        return row


def _fail(rows: list[Running], error: BaseException) -> None:
    """Mark the requests of `rows` failed; the next packing ends them."""
    for running in rows:
        running.utterance.done = True
        running.error = error
