"""Text to audio chunks: sentence chunks through the engine, then speed, then the watermark.

A request's text is cut into sentence chunks (`csm.longform.split_sentences`), generated
one after another through the engine, each hearing the voice and the chunks before it
that fit, as `csm say` does. Every chunk of audio the engine sends is then stretched to
the requested speed and, unless the operator turned the watermark off, marked: a stream
clip by clip (`csm.watermark.stream`), a whole response (`stream: false`) as one clip,
exactly as `Generator.generate` marks it. The CPU-heavy marking runs off the event loop.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from csm.engine import Engine, QueueFullError, Request
from csm.generator import Generator, Segment
from csm.longform import Turn, fit_context, split_sentences
from csm.server.errors import APIError
from csm.server.protocol import SpeechRequest
from csm.server.stretch import TimeStretch, stretch
from csm.server.uploads import decode_audio
from csm.server.voices import Voices
from csm.threads import to_fresh_thread
from csm.watermark.stream import ClipMarker

MAX_CONTEXT_AUDIO_SECONDS = 30.0
# How long a client told "queue full" should wait before it tries again.
RETRY_AFTER_SECONDS = 1


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


class SpeechService:
    """Runs plans on the engine; `mark` is the watermark (None when the operator turned it off)."""

    def __init__(self, engine: Engine, generator: Generator, voices: Voices, mark: Callable | None):
        self.engine = engine
        self.generator = generator
        self.voices = voices
        self.mark = mark
        self.sample_rate = generator.sample_rate

    async def plan(self, request: SpeechRequest) -> Plan:
        voice = self.voices.resolve(request.voice_id)
        context = []
        for index, turn in enumerate(request.context):
            name = f"context.{index}.audio"
            try:
                data = base64.b64decode(turn.audio, validate=True)
                audio = await to_fresh_thread(decode_audio, data, name, MAX_CONTEXT_AUDIO_SECONDS)
            except (ValueError, binascii.Error) as error:
                raise APIError(400, _why(error, name), param=name, code="invalid_audio") from None
            context.append(Segment(speaker=turn.speaker, text=turn.text, audio=audio))
        return Plan(
            turns=tuple(Turn(voice.speaker, chunk) for chunk in split_sentences(request.input)),
            prompts=(*voice.prompts, *context),
            seed=request.seed if request.seed is not None else voice.seed,
            temperature=request.temperature,
            topk=request.topk,
            max_audio_length_ms=request.max_audio_seconds * 1000,
            speed=request.speed,
        )

    def start(self, plan: Plan):
        """Submits the first chunk now, so that a bad request or a full queue is answered before any audio."""
        return self._submit(plan, 0, [])

    async def chunks(self, plan: Plan, first) -> AsyncIterator[torch.Tensor]:
        """The engine's unmarked audio for every sentence chunk, in order; cancels what it leaves unread."""
        history: list[Segment] = []
        for index, turn in enumerate(plan.turns):
            handle = first if index == 0 else self._submit(plan, index, history)
            pieces, completed = [], False
            try:
                async for chunk in handle:
                    pieces.append(chunk)
                    yield chunk
                completed = True
            finally:
                if not completed:
                    handle.cancel()
            if pieces:
                history.append(Segment(speaker=turn.speaker, text=turn.text, audio=torch.cat(pieces)))

    async def stream(self, plan: Plan, first) -> AsyncIterator[torch.Tensor]:
        """The response's audio as it is made: stretched, then marked clip by clip."""
        stretcher = TimeStretch(plan.speed, self.sample_rate) if plan.speed != 1.0 else None
        marker = ClipMarker(self.mark) if self.mark is not None else None
        async for chunk in self.chunks(plan, first):
            audio = stretcher.push(chunk) if stretcher else chunk
            for piece in await self._marked(marker, audio):
                yield piece
        rest = stretcher.finish() if stretcher else torch.zeros(0)
        for piece in await self._marked(marker, rest):
            yield piece
        if marker is not None:
            for piece in await to_fresh_thread(marker.finish):
                yield piece

    async def whole(self, plan: Plan, first) -> torch.Tensor:
        """The response's audio in one piece, marked as one clip."""
        pieces = [chunk async for chunk in self.chunks(plan, first)]
        audio = torch.cat(pieces) if pieces else torch.zeros(0)
        if plan.speed != 1.0 and audio.numel():
            audio = stretch(audio, plan.speed, self.sample_rate)
        if self.mark is not None and audio.numel():
            audio = await to_fresh_thread(self.mark, audio)
        return audio

    def input_tokens(self, plan: Plan) -> int:
        return sum(self.generator.prompt_length(turn.text, turn.speaker, []) for turn in plan.turns)

    def _submit(self, plan: Plan, index: int, history: list[Segment]):
        turn = plan.turns[index]
        context = fit_context(self.generator, turn, plan.prompts, history, plan.max_audio_length_ms)
        length = self.generator.prompt_length(turn.text, turn.speaker, context)
        budget = self.generator.max_prompt_length(plan.max_audio_length_ms)
        if length > budget:
            raise APIError(
                400,
                f"context too long: voice, context and text take {length} positions, but with "
                f"max_audio_seconds={plan.max_audio_length_ms / 1000:g} at most {budget} fit; shorten the context "
                "or lower max_audio_seconds",
                param="context",
                code="context_too_long",
            )
        request = Request(
            text=turn.text,
            speaker=turn.speaker,
            context=context,
            max_audio_length_ms=plan.max_audio_length_ms,
            temperature=plan.temperature,
            topk=plan.topk,
            seed=None if plan.seed is None else plan.seed + index,
        )
        try:
            return self.engine.submit(request)
        except QueueFullError as error:
            raise APIError(
                429,
                f"server busy: {error}; retry later",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from None
        except ValueError as error:
            raise APIError(400, str(error), code="invalid_value") from None

    async def _marked(self, marker: ClipMarker | None, audio: torch.Tensor) -> list[torch.Tensor]:
        if not audio.numel():
            return []
        if marker is None:
            return [audio]
        return await to_fresh_thread(marker.push, audio)


def _why(error: Exception, name: str) -> str:
    return (
        str(error)
        if isinstance(error, ValueError) and not isinstance(error, binascii.Error)
        else f"{name} is not valid base64"
    )
