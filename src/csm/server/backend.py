"""What the routes run on: a back end that admits speech requests and streams their audio.

The routes (`csm.server.app`) parse, check, authorise, encode and answer; a back end turns a
checked `SpeechRequest` into audio, and says how its engines are. Two implement it: `LocalBackend`
here, the engine in this process (`csm serve`), and `csm.cluster.ingress.RayBackend`, engine
replicas reached through Ray Serve deployment handles. Both raise `APIError`s, so a request is
answered the same way whichever runs it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import torch

from csm.server.protocol import SpeechRequest
from csm.server.speech import Run, SpeechService
from csm.server.voices import Voices
from csm.watermark.stream import FRAME_SAMPLES


class Speech(Protocol):
    """One admitted request: its audio (stretched and marked) as it is made, and what it made."""

    replica: str | None  # the engine replica that serves it; None in one process
    generated: int  # samples the model made so far (before speed)
    truncated: bool  # cut at the request's audio cap

    def audio(self) -> AsyncIterator[torch.Tensor]:
        """The response's audio, piece by piece; an `APIError` if generation fails."""
        ...

    def input_tokens(self) -> int:
        """Text positions of the request (read once its audio has ended)."""
        ...

    def close(self) -> None:
        """Cancels what still runs and frees its place (again: nothing happens)."""
        ...


class Backend(Protocol):
    """Admits and runs speech requests; knows the voices and the engines' state."""

    voices: Voices
    sample_rate: int

    async def speak(self, request: SpeechRequest) -> Speech:
        """Admits `request` and checks its first chunk: a full engine (429) or a bad request is
        an `APIError` here, before any audio."""
        ...

    async def health(self) -> tuple[int, dict]:
        """The status code and body of `/health`."""
        ...

    async def engine_stats(self) -> list[tuple[dict[str, str], dict]]:
        """Each engine's `stats()`, with the labels that tell it apart (none in one process)."""
        ...


def frames(samples: int) -> int:
    """80 ms audio frames in `samples` (the usage's output tokens)."""
    return -(-samples // FRAME_SAMPLES)


class LocalSpeech:
    """A request on the engine of this process."""

    replica = None

    def __init__(self, service: SpeechService, run: Run):
        self._service, self._run = service, run

    @property
    def generated(self) -> int:
        return self._run.generated

    @property
    def truncated(self) -> bool:
        return self._run.truncated

    def audio(self) -> AsyncIterator[torch.Tensor]:
        return self._service.stream(self._run)

    def input_tokens(self) -> int:
        return self._service.input_tokens(self._run.plan)

    def close(self) -> None:
        self._run.close()


class LocalBackend:
    """The engine of this process, through its `SpeechService`."""

    def __init__(self, service: SpeechService):
        self.service = service
        self.voices = service.voices
        self.sample_rate = service.sample_rate

    async def speak(self, request: SpeechRequest) -> LocalSpeech:
        run = await self.service.start(await self.service.plan(request))
        return LocalSpeech(self.service, run)

    async def health(self) -> tuple[int, dict]:
        failure = self.service.engine.failure
        if failure is not None:
            reason = f"the speech engine failed: {type(failure).__name__}: {failure}"
            return 503, {"status": "failed", "reason": reason}
        return 200, {"status": "ok"}

    async def engine_stats(self) -> list[tuple[dict[str, str], dict]]:
        return [({}, self.service.engine.stats())]
