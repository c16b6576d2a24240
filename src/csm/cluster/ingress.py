"""The ingress: `csm serve`'s routes over engine replicas reached through Ray Serve handles.

`Ingress` is the deployment that Serve's HTTP proxy calls; it builds the same FastAPI app as
`csm serve` (`csm.server.app.create_app`: parsing, checks, auth, encoding, voices, the page,
health, metrics) over `RayBackend`. A speech request goes to an engine replica by its voice
(`multiplexed_model_id`), as a stream of `csm.cluster.wire` messages. Voices are uploaded to and
deleted from the `voices_dir` that every replica reads.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import torch
from fastapi import FastAPI
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from csm.cluster.options import ClusterOptions
from csm.cluster.wire import Audio, Ended, Failed, Started
from csm.server.app import create_app
from csm.server.errors import APIError
from csm.server.main import api_key_from_environment
from csm.server.protocol import SpeechRequest
from csm.server.speech import RETRY_AFTER_SECONDS
from csm.server.voices import SAMPLE_RATE, Voices, VoiceStore, builtin_voices
from csm.threads import run_in_fresh_thread

log = logging.getLogger("csm.cluster")


class RemoteSpeech:
    """A request running on an engine replica: its message stream, read as audio."""

    def __init__(self, stream: DeploymentResponseGenerator, replica: str):
        self._stream = stream
        self.replica = replica
        self.generated = 0
        self.truncated = False
        self._input_tokens = 0

    async def audio(self) -> AsyncIterator[torch.Tensor]:
        while True:
            try:
                message = await anext(self._stream)
            except StopAsyncIteration:
                raise APIError(
                    503, f"engine replica {self.replica} ended the stream early", code="replica_lost"
                ) from None
            except Exception as error:  # noqa: BLE001 - a replica that died, or Ray's own failure
                raise APIError(
                    503,
                    f"engine replica {self.replica} was lost mid-request ({type(error).__name__}); retry",
                    code="replica_lost",
                ) from None
            if isinstance(message, Failed):
                raise message.error()
            if isinstance(message, Ended):
                self.generated, self.truncated, self._input_tokens = (
                    message.generated,
                    message.truncated,
                    message.input_tokens,
                )
                return
            assert isinstance(message, Audio), message
            self.generated = message.generated
            yield message.samples

    def input_tokens(self) -> int:
        return self._input_tokens

    def close(self) -> None:
        _cancel(self._stream)


class RayBackend:
    """Engine replicas through deployment handles; their figures from the board (`csm.cluster.board`)."""

    def __init__(self, voices: Voices, engines: DeploymentHandle, board: DeploymentHandle):
        self.voices = voices
        self.sample_rate = SAMPLE_RATE
        self._engines = engines
        self._board = board

    async def speak(self, request: SpeechRequest) -> RemoteSpeech:
        handle = self._engines.options(multiplexed_model_id=request.voice_id, stream=True)
        stream = None
        try:
            stream = handle.speak.remote(request.model_dump(mode="json"))
            first = await anext(stream)
        except BaseException as error:
            if stream is not None:
                _cancel(stream)
            if isinstance(error, Exception):
                raise _unavailable(error) from None
            raise
        if isinstance(first, Failed):
            _cancel(stream)
            raise first.error()
        assert isinstance(first, Started), first
        return RemoteSpeech(stream, first.replica)

    async def health(self) -> tuple[int, dict]:
        try:
            live = await self._board.live.remote()
        except Exception as error:  # noqa: BLE001 - the board is being replaced
            return 503, {"status": "unavailable", "reason": f"replica reports unreachable: {type(error).__name__}"}
        replicas = [
            {"id": replica, "pid": report["pid"], "failure": report["failure"],
             "active": report["stats"]["active"], "queue_length": report["stats"]["queue_length"]}
            for replica, report in sorted(live.items())
        ]  # fmt: skip
        ready = sum(report["failure"] is None for report in replicas)
        body = {"status": "ok" if ready else "unavailable", "ready": ready, "replicas": replicas}
        if not ready:
            body["reason"] = "no engine replica is ready"
        return (200 if ready else 503), body

    async def engine_stats(self) -> list[tuple[dict[str, str], dict]]:
        live = await self._board.live.remote()
        return [({"replica": replica}, report["stats"]) for replica, report in sorted(live.items())]


def _cancel(stream: DeploymentResponseGenerator) -> None:
    """Cancels a request wherever it is (waiting for a replica, or running on one)."""
    try:
        stream.cancel()
    except Exception:  # noqa: BLE001 - Ray re-raises why the request never ran (backpressure): nothing to cancel
        pass


def _unavailable(error: Exception) -> APIError:
    """The answer when no replica took a request: 429 when every replica's rows and the wait are full."""
    cause = getattr(error, "cause", None)
    if isinstance(error, BackPressureError) or isinstance(cause, BackPressureError):
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        return APIError(429, "server busy: every engine replica is full", code="queue_full", headers=headers)
    log.warning("no engine replica took a request: %r", error)
    return APIError(
        503, f"no engine replica could take the request ({type(error).__name__}); retry", code="unavailable"
    )


class Ingress:
    """The HTTP tier (Serve builds its app with `__serve_build_asgi_app__`, on the replica)."""

    def __init__(self, options: ClusterOptions, engines: DeploymentHandle, board: DeploymentHandle):
        builtin = run_in_fresh_thread(builtin_voices, options.model)
        voices = Voices(builtin, VoiceStore(options.voices_dir))
        api_key = options.api_key or api_key_from_environment()  # as `csm serve`: CSM_API_KEY
        self._app = create_app(RayBackend(voices, engines, board), api_key=api_key)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app
