"""Text to audio chunks: sentence chunks through the engine, then speed, then the watermark.

A request's text is cut into sentence chunks (`csm.longform.split_sentences`), generated
one after another through the engine, each hearing the voice and the chunks before it
that fit, as `csm say` does. A request makes at most `max_request_seconds` of audio in
all: each chunk may only use what the chunks before it left, and once nothing is left
the response ends cleanly (cut at the cap, not refused: how long speech runs is known
only once it is made). Every chunk of audio the engine sends is then stretched to the
requested speed and, unless the operator turned the watermark off, marked clip by clip
(`csm.watermark.stream`), streamed or whole alike, so marking holds one clip in memory,
not the response. The CPU-heavy marking runs off the event loop.

A request takes one place in the engine (`Engine.reserve`) before its first chunk, and all
its chunks run in that place: only admission can answer 429, never a later chunk of a
response already under way. Engine errors become API errors here (`api_error`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from csm.engine import (
    Admission,
    ClientTimeoutError,
    Engine,
    EngineClosedError,
    EngineFailedError,
    GenerationError,
    Handle,
    QueueFullError,
    Request,
)
from csm.generator import Generator, Segment
from csm.longform import Turn, fit_context, split_sentences
from csm.server.errors import APIError
from csm.server.protocol import SpeechRequest
from csm.server.stretch import TimeStretch
from csm.server.uploads import decode_audio
from csm.server.voices import Voices
from csm.threads import to_fresh_thread
from csm.watermark.stream import FRAME_SAMPLES, ClipMarker

log = logging.getLogger("csm.server")

MAX_CONTEXT_AUDIO_SECONDS = 30.0
DEFAULT_MAX_REQUEST_SECONDS = 120.0
# How long a client told "queue full" should wait before it tries again.
RETRY_AFTER_SECONDS = 1
_FRAMES_PER_SECOND = 12.5


@dataclass(frozen=True)
class Plan:
    """A checked request, ready to generate."""

    turns: tuple[Turn, ...]
    prompts: tuple[Segment, ...]
    seed: int | None
    temperature: float
    topk: int
    max_audio_length_ms: float
    speed: float
    max_frames: int  # what the whole request may generate, before speed


@dataclass
class Run:
    """One request on the engine: its place, its first chunk's handle and the audio made so far."""

    plan: Plan
    admission: Admission
    first: Handle
    generated: int = 0  # samples the model made (before speed)
    truncated: bool = False

    @property
    def frames(self) -> int:
        return math.ceil(self.generated / FRAME_SAMPLES)

    def close(self) -> None:
        """Cancels what still runs and gives the place back (again: nothing happens)."""
        self.first.cancel()
        self.admission.release()


class SpeechService:
    """Runs plans on the engine; `mark` is the watermark (None when the operator turned it off)."""

    def __init__(
        self,
        engine: Engine,
        generator: Generator,
        voices: Voices,
        mark: Callable | None,
        max_request_seconds: float = DEFAULT_MAX_REQUEST_SECONDS,
    ):
        self.engine = engine
        self.generator = generator
        self.voices = voices
        self.mark = mark
        self.max_request_seconds = max_request_seconds
        self.sample_rate = generator.sample_rate

    async def plan(self, request: SpeechRequest) -> Plan:
        voice = await asyncio.to_thread(self.voices.resolve, request.voice_id)
        context = []
        for index, turn in enumerate(request.context):
            name = f"context.{index}.audio"
            try:
                data = base64.b64decode(turn.audio, validate=True)
                audio = await to_fresh_thread(decode_audio, data, name, MAX_CONTEXT_AUDIO_SECONDS)
            except (ValueError, binascii.Error) as error:
                raise APIError(400, _why(error, name), param=name, code="invalid_audio") from None
            context.append(Segment(speaker=turn.speaker, text=turn.text, audio=audio))
        # Neither what is made nor what is sent (made / speed) passes the cap.
        max_seconds = self.max_request_seconds * min(1.0, request.speed)
        return Plan(
            turns=tuple(Turn(voice.speaker, chunk) for chunk in split_sentences(request.input)),
            prompts=(*voice.prompts, *context),
            seed=request.seed if request.seed is not None else voice.seed,
            temperature=request.temperature,
            topk=request.topk,
            max_audio_length_ms=request.max_audio_seconds * 1000,
            speed=request.speed,
            max_frames=math.floor(max_seconds * _FRAMES_PER_SECOND + 1e-9),
        )

    async def start(self, plan: Plan) -> Run:
        """Takes the request's place and checks its first chunk, so that a full engine or a bad
        request is answered before any audio."""
        try:
            admission = self.engine.reserve()
        except Exception as error:  # noqa: BLE001 - every engine error has its answer
            raise api_error(error) from None
        first = None
        try:
            first = self._submit(plan, 0, [], plan.max_frames, admission)
            await first.checked()
        except BaseException as error:
            if first is not None:
                first.cancel()
            admission.release()
            if isinstance(error, Exception) and not isinstance(error, APIError):
                raise api_error(error) from None
            raise
        return Run(plan, admission, first)

    async def chunks(self, run: Run) -> AsyncIterator[torch.Tensor]:
        """The engine's unmarked audio for every sentence chunk, in order; cancels what it leaves unread."""
        plan = run.plan
        history: list[Segment] = []
        for index, turn in enumerate(plan.turns):
            left = plan.max_frames - run.frames
            if left <= 0:
                run.truncated = True
                log.info("request cut at --max-request-seconds after %d of %d chunks", index, len(plan.turns))
                return
            handle = run.first if index == 0 else self._submit(plan, index, history, left, run.admission)
            pieces, completed = [], False
            try:
                async for chunk in handle:
                    pieces.append(chunk)
                    run.generated += chunk.numel()
                    yield chunk
                completed = True
            except Exception as error:  # noqa: BLE001 - mapped, not swallowed
                raise api_error(error) from None
            finally:
                if not completed:
                    handle.cancel()
            if pieces:
                history.append(Segment(speaker=turn.speaker, text=turn.text, audio=torch.cat(pieces)))
                trim_history(history, self.generator.max_prompt_length(0))

    async def stream(self, run: Run) -> AsyncIterator[torch.Tensor]:
        """The response's audio as it is made: stretched, then marked clip by clip."""
        speed = run.plan.speed
        stretcher = TimeStretch(speed, self.sample_rate) if speed != 1.0 else None
        marker = ClipMarker(self.mark) if self.mark is not None else None
        async for chunk in self.chunks(run):
            audio = stretcher.push(chunk) if stretcher else chunk
            for piece in await self._marked(marker, audio):
                yield piece
        rest = stretcher.finish() if stretcher else torch.zeros(0)
        for piece in await self._marked(marker, rest):
            yield piece
        if marker is not None:
            for piece in await to_fresh_thread(marker.finish):
                yield piece

    def input_tokens(self, plan: Plan) -> int:
        return sum(self.generator.prompt_length(turn.text, turn.speaker, []) for turn in plan.turns)

    def _submit(
        self, plan: Plan, index: int, history: list[Segment], frames_left: int, admission: Admission
    ) -> Handle:
        turn = plan.turns[index]
        max_ms = min(plan.max_audio_length_ms, frames_left * 1000 / _FRAMES_PER_SECOND)
        context = fit_context(self.generator, turn, plan.prompts, history, max_ms)
        length = self.generator.prompt_length(turn.text, turn.speaker, context)
        budget = self.generator.max_prompt_length(max_ms)
        if length > budget:
            raise APIError(
                400,
                f"context too long: voice, context and text take {length} positions, but with "
                f"max_audio_seconds={max_ms / 1000:g} at most {budget} fit; shorten the context "
                "or lower max_audio_seconds",
                param="context",
                code="context_too_long",
            )
        request = Request(
            text=turn.text,
            speaker=turn.speaker,
            context=context,
            max_audio_length_ms=max_ms,
            temperature=plan.temperature,
            topk=plan.topk,
            seed=None if plan.seed is None else plan.seed + index,
        )
        try:
            return self.engine.submit(request, admission)
        except Exception as error:  # noqa: BLE001 - every engine error has its answer
            raise api_error(error) from None

    async def _marked(self, marker: ClipMarker | None, audio: torch.Tensor) -> list[torch.Tensor]:
        if not audio.numel():
            return []
        if marker is None:
            return [audio]
        return await to_fresh_thread(marker.push, audio)


def api_error(error: Exception) -> APIError:
    """The answer to an engine's error (an unexpected one is a 500 that names its type)."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, QueueFullError):
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        return APIError(429, f"server busy: {error}", code="queue_full", headers=headers)
    if isinstance(error, EngineFailedError):
        return APIError(503, f"the speech engine failed: {error}", code="engine_failed")
    if isinstance(error, EngineClosedError):
        return APIError(503, "the server is shutting down; retry on another", code="shutting_down")
    if isinstance(error, ClientTimeoutError):
        return APIError(408, f"cancelled: {error}", code="client_timeout")
    if isinstance(error, GenerationError):
        return APIError(500, f"generation failed: {error}", code="generation_failed")
    if isinstance(error, ValueError):
        return APIError(400, str(error), code="invalid_value")
    log.exception("unexpected error from the engine", exc_info=error)
    return APIError(500, f"internal error: {type(error).__name__}", code="internal_error")


def trim_history(history: list[Segment], max_positions: int) -> None:
    """Drops the oldest chunks while the audio of all takes more than `max_positions` prompt
    positions: those could never fit in a prompt again (`fit_context` keeps a recent tail), so
    a request's history stays bounded however long its text."""
    while history and sum(math.ceil(segment.audio.numel() / FRAME_SAMPLES) + 1 for segment in history) > max_positions:
        history.pop(0)


def _why(error: Exception, name: str) -> str:
    return (
        str(error)
        if isinstance(error, ValueError) and not isinstance(error, binascii.Error)
        else f"{name} is not valid base64"
    )
