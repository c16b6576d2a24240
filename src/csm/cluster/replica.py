"""An engine replica: the model and its continuous-batching engine, streaming audio to the ingress.

One per GPU (or per CPU machine). It runs what `csm serve` runs below its routes, the same
`LocalBackend` over a `SpeechService`, and streams the `csm.cluster.wire` messages of each
request to the ingress through Serve's deployment handles. Requests are multiplexed on their
voice id: `voice` is Serve's model loader, so the router sends a voice's requests to the
replicas that have loaded it, whose engine keeps that voice's prompt state (no prefill). Voices
are read from the `voices_dir` every replica shares. Ray gives a replica at most `max_batch`
requests at a time (its rows); the wait for a free row is at the ingress, bounded by `max_queue`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from csm.cluster.board import REPORT_SECONDS
from csm.cluster.options import ClusterOptions
from csm.cluster.wire import Audio, Ended, Failed, Started
from csm.devices import default_device, default_dtype, parse_device, parse_dtype
from csm.engine import Engine
from csm.generator import load_csm_1b
from csm.server.backend import LocalBackend
from csm.server.errors import APIError
from csm.server.protocol import SpeechRequest
from csm.server.speech import SpeechService
from csm.server.voices import CACHED_VOICES, VoicePrompt, Voices, VoiceStore, builtin_voices
from csm.threads import make_this_thread_serial, run_in_fresh_thread

log = logging.getLogger("csm.cluster")


class SpeechEngine:
    """The model, the engine and the voices of one replica (see the module's docstring)."""

    async def __init__(self, options: ClusterOptions, board: DeploymentHandle):
        # This thread runs the replica's event loop: its torch work stays serial (see csm.threads).
        make_this_thread_serial()
        device = parse_device(options.device) if options.device else default_device()
        dtype = parse_dtype(options.dtype) if options.dtype else default_dtype(device)
        generator = run_in_fresh_thread(
            load_csm_1b,
            device,
            dtype=dtype,
            model=options.model,
            mimi=options.mimi,
            tokenizer=options.tokenizer,
            watermark=options.watermarking,
            watermarker=options.watermarker,
            quantize=options.quantize,
            compile=options.compile,
            adapter=options.adapter,
        )
        voices = Voices(run_in_fresh_thread(builtin_voices, options.model), VoiceStore(options.voices_dir))
        # Ray sends at most max_batch requests here, so none waits in the engine: waiting
        # happens at the ingress, where the first replica with a free row takes the request.
        self.engine = Engine(generator, max_batch=options.max_batch, max_queue=0)
        mark = generator.watermark if options.watermark else None
        self.backend = LocalBackend(SpeechService(self.engine, generator, voices, mark))
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._board = board
        self._reporting = asyncio.get_running_loop().create_task(self._report())
        log.info(
            "engine replica %s: CSM %s on %s (%s), %d rows",
            self.replica,
            options.model,
            device,
            dtype,
            options.max_batch,
        )

    @serve.multiplexed(max_num_models_per_replica=CACHED_VOICES)
    async def voice(self, voice_id: str) -> VoicePrompt:
        """Serve's loader for the voice a request names: reads it (stored voices: from the shared
        folder) and marks this replica as holding it, for the router."""
        return await asyncio.to_thread(self.backend.voices.resolve, voice_id)

    async def speak(self, request: dict) -> AsyncIterator[Started | Audio | Ended | Failed]:
        """One request's messages (`csm.cluster.wire`); cancelling the stream cancels its generation."""
        try:
            await self.voice(serve.get_multiplexed_model_id())
            speech = await self.backend.speak(SpeechRequest.model_validate(request))
        except APIError as error:
            yield Failed.of(error)
            return
        try:
            yield Started(self.replica)
            async for samples in speech.audio():
                yield Audio(samples, speech.generated)
            yield Ended(speech.generated, speech.truncated, speech.input_tokens())
        except APIError as error:
            yield Failed.of(error)
        finally:
            speech.close()

    def check_health(self) -> None:
        """Serve replaces a replica whose engine's worker died."""
        if self.engine.failure is not None:
            raise RuntimeError(f"the speech engine failed: {self.engine.failure!r}")

    async def _report(self) -> None:
        """Sends this replica's figures to the board, for the ingress's /health and /metrics."""
        while True:
            failure = self.engine.failure
            report = {
                "pid": os.getpid(),
                "stats": self.engine.stats(),
                "failure": None if failure is None else f"{type(failure).__name__}: {failure}",
            }
            try:
                await self._board.put.remote(self.replica, report)
            except Exception as error:  # noqa: BLE001 - the board is being replaced: report again later
                log.warning("engine replica %s could not report: %s", self.replica, error)
            await asyncio.sleep(REPORT_SECONDS)

    def __del__(self):
        reporting = getattr(self, "_reporting", None)
        if reporting is not None:
            reporting.cancel()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
