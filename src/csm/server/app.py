"""The HTTP routes: OpenAI's speech, voices and models endpoints, health, metrics and the page.

Thin: requests are checked here (pydantic, auth, size caps) and handed to a back end
(`csm.server.backend`: the engine of this process for `csm serve`, Ray Serve engine replicas
for `csm.cluster`); the engine knows nothing of HTTP. A client that goes away mid-response
cancels its generation (Starlette stops the body, and closing the request's `Speech` cancels
the engine request it was reading).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from importlib import resources

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from csm.server.backend import Backend, Speech, frames
from csm.server.encoding import MEDIA_TYPES, open_encoder, wav_header
from csm.server.errors import APIError, envelope, from_validation, install_handlers
from csm.server.metrics import Metrics
from csm.server.protocol import DeletedVoice, Model, ModelList, SpeechRequest, VoiceList
from csm.server.uploads import body_parts, decode_audio, read_body
from csm.server.voices import VoiceLimitError
from csm.threads import to_fresh_thread

log = logging.getLogger("csm.server")

MODEL_ID = "csm-1b"
MAX_JSON_BYTES = 16 * 2**20  # room for a few base64 context clips
MAX_SAMPLE_BYTES = 10 * 2**20
MAX_SAMPLE_SECONDS = 30.0
# The multipart fields around the sample (name, transcript, consent) get this much on top.
_FORM_OVERHEAD = 2**20
_STATIC = resources.files("csm.server") / "static"


def create_app(backend: Backend, *, api_key: str | None = None, cors_origins: tuple[str, ...] = ()) -> FastAPI:
    app = FastAPI(title="csm", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics()
    app.state.metrics = metrics
    install_handlers(app)
    app.add_middleware(_CountRequests, metrics=metrics)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"], allow_headers=["*"])
    api = APIRouter(dependencies=[Depends(_authorizer(api_key))])

    @app.get("/health")
    async def health() -> JSONResponse:
        status, body = await backend.health()
        return JSONResponse(body, status_code=status)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(_STATIC / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(_STATIC)), name="static")

    @api.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(await backend.engine_stats()), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[Model(id=MODEL_ID, created=0)])

    @api.get("/v1/audio/voices")
    async def list_voices() -> VoiceList:
        return VoiceList(data=await asyncio.to_thread(backend.voices.listing))

    @api.post("/v1/audio/voices")
    async def create_voice(request: Request) -> JSONResponse:
        form = await _form(request, MAX_SAMPLE_BYTES + _FORM_OVERHEAD)
        try:
            return await _create_voice(backend, dict(form.multi_items()))
        finally:
            await form.close()  # the sample's temporary file, whatever the answer

    @api.delete("/v1/audio/voices/{voice_id}")
    async def delete_voice(voice_id: str) -> DeletedVoice:
        if voice_id in backend.voices.builtin or voice_id in backend.voices.openai:
            raise APIError(400, f"{voice_id!r} is a built-in voice and cannot be deleted", param="voice_id")
        if not await asyncio.to_thread(backend.voices.store.delete, voice_id):
            raise APIError(404, f"no stored voice {voice_id!r}", param="voice_id", code="voice_not_found")
        return DeletedVoice(id=voice_id)

    @api.post("/v1/audio/speech")
    async def speech(request: Request) -> Response:
        started = time.perf_counter()
        try:
            body = SpeechRequest.model_validate_json(await read_body(request, MAX_JSON_BYTES))
        except ValidationError as error:
            raise from_validation(error) from None
        speech = await backend.speak(body)
        audio = _AudioBody(backend.sample_rate, speech, body.response_format, metrics, started)
        sse = body.stream_format == "sse"
        headers = {"X-Csm-Replica": speech.replica} if speech.replica is not None else {}
        if not (sse or body.stream):
            try:
                response = await _unless_gone(request, audio.whole())
            finally:
                speech.close()
            response.headers.update(headers)
            return response
        try:
            # Headers leave with the first audio: whatever fails before it is answered with its status.
            content = await _primed(request, audio.events() if sse else aiter(audio))
        except BaseException:
            speech.close()
            raise
        if sse:
            headers["Cache-Control"] = "no-cache"
            return _Streamed(speech, content, audio, media_type="text/event-stream", headers=headers)
        return _Streamed(speech, content, audio, media_type=MEDIA_TYPES[body.response_format], headers=headers)

    app.include_router(api)
    return app


async def _create_voice(backend: Backend, fields: dict) -> JSONResponse:
    name = _text_field(fields, "name", 64)
    text = _text_field(fields, "text", 4096)
    _text_field(fields, "consent", 256)
    sample = fields.get("audio_sample")
    if not isinstance(sample, UploadFile):
        raise APIError(400, "audio_sample: an audio file is required", param="audio_sample", code="missing_field")
    if sample.size is not None and sample.size > MAX_SAMPLE_BYTES:
        raise APIError(413, "audio_sample is larger than 10 MiB", param="audio_sample", code="file_too_large")
    try:
        backend.voices.store.check_room()  # before decoding; `add` checks again
        data = await sample.read()
        try:
            audio = await to_fresh_thread(decode_audio, data, "audio_sample", MAX_SAMPLE_SECONDS)
        except ValueError as error:
            raise APIError(400, str(error), param="audio_sample", code="invalid_audio") from None
        voice = await to_fresh_thread(backend.voices.store.add, name, text, audio)
    except VoiceLimitError as error:
        raise APIError(400, str(error), code="too_many_voices") from None
    return JSONResponse(voice.listing().model_dump(), status_code=200)


class _AudioBody:
    """One response's audio, encoded by one encoder: streamed bytes, SSE events, or whole."""

    def __init__(self, sample_rate: int, speech: Speech, response_format: str, metrics: Metrics, started: float):
        self.sample_rate, self.speech = sample_rate, speech
        self.format, self.metrics, self.started = response_format, metrics, started
        self.samples = 0  # sent, after speed
        self.broken = False  # failed after audio was sent: the body must not look complete

    async def __aiter__(self) -> AsyncIterator[bytes]:
        """The encoded stream. Raw audio cannot carry an error, so one after the first bytes
        (logged) sets `broken`, and `_Streamed` leaves the body unfinished: the client sees a
        cut response (HTTP/1.1: no last chunk), never a shorter file that looks whole."""
        try:
            async for data in self._encoded(self.format):
                if data:
                    yield data
        except APIError as error:
            if not self.samples:
                raise
            log.warning("stream cut after %d samples: %s", self.samples, error.message)
            self.broken = True

    async def _encoded(self, response_format: str) -> AsyncIterator[bytes]:
        encoder = open_encoder(response_format, self.sample_rate)
        try:
            async for piece in self.speech.audio():
                if self.samples == 0:
                    self.metrics.time_to_first_audio.observe(time.perf_counter() - self.started)
                self.samples += piece.numel()
                yield encoder.encode(piece)
        finally:
            # What the model made: speed changes what is sent, not the work done.
            self.metrics.audio_seconds.inc(self.speech.generated / self.sample_rate)
        yield encoder.finish()

    async def events(self) -> AsyncIterator[str]:
        """`speech.audio.delta` events with base64 audio, then `speech.audio.done`, or after
        some audio `speech.audio.error` (before any, the error is the response's status)."""
        try:
            async for data in self._encoded(self.format):
                if data:
                    yield _event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
        except APIError as error:
            if not self.samples:
                raise
            log.warning("stream ended after %d samples: %s", self.samples, error.message)
            yield _event({"type": "speech.audio.error", **envelope(error.status, error.message, code=error.code)})
            return
        text, made = self.speech.input_tokens(), frames(self.speech.generated)
        yield _event(
            {
                "type": "speech.audio.done",
                "usage": {"input_tokens": text, "output_tokens": made, "total_tokens": text + made},
            }
        )

    async def whole(self) -> Response:
        """Everything at once (the stream's audio, encoded as it comes), with its duration and real-time factor.

        Only encoded bytes are kept; a wav gets its exact header once the length is known.
        """
        parts = [data async for data in self._encoded("pcm" if self.format == "wav" else self.format)]
        if self.format == "wav":
            parts.insert(0, wav_header(self.sample_rate, self.samples))
        content = b"".join(parts)
        seconds = self.samples / self.sample_rate
        wall = time.perf_counter() - self.started
        headers = {
            "X-Audio-Duration": f"{seconds:.3f}",
            "X-Real-Time-Factor": f"{wall / seconds:.3f}" if seconds else "0",
        }
        if self.speech.truncated:
            headers["X-Audio-Truncated"] = "max-request-seconds"
        return Response(content, media_type=MEDIA_TYPES[self.format], headers=headers)


async def _primed(request: Request, parts: AsyncIterator):
    """`parts` with its first item made now (or the error that came instead)."""
    try:
        first = [await _unless_gone(request, anext(parts))]
    except StopAsyncIteration:
        first = []  # no audio at all (speech ended at once)

    async def rest():
        for part in first:
            yield part
        async for part in parts:
            yield part

    return rest()


class _Streamed(StreamingResponse):
    """A streamed response that ends its speech however it ends, even when the client
    leaves before the body starts (later sentence chunks cancel themselves), and that never
    finishes the body of a stream that broke (`_AudioBody.broken`)."""

    def __init__(self, speech: Speech, content, audio: _AudioBody, **kwargs):
        super().__init__(content, **kwargs)
        self._speech, self._audio = speech, audio

    async def __call__(self, scope, receive, send) -> None:
        async def send_unless_broken(message) -> None:
            ends_body = message["type"] == "http.response.body" and not message.get("more_body", False)
            if not (ends_body and self._audio.broken):
                await send(message)

        try:
            await super().__call__(scope, receive, send_unless_broken)
        finally:
            self._speech.close()


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _unless_gone(request: Request, work):
    """Awaits `work` (an awaitable), cancelling it if the client disconnects first."""

    async def wrapped():
        return await work

    task = asyncio.ensure_future(wrapped())
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise APIError(499, "client disconnected")


async def _form(request: Request, limit: int) -> FormData:
    """A multipart form, its body capped at `limit` bytes while it streams in."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(415, "expected multipart/form-data", code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, "upload larger than 10 MiB", code="file_too_large")

    async def capped() -> AsyncIterator[bytes]:
        received = 0
        async for part in body_parts(request):
            received += len(part)
            if received > limit:
                raise APIError(413, "upload larger than 10 MiB", code="file_too_large")
            yield part

    parser = MultiPartParser(request.headers, capped(), max_files=1, max_fields=8, max_part_size=64 * 1024)
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise APIError(400, f"bad multipart body: {error.message}", code="invalid_form") from None
    return form


def _text_field(fields: dict, name: str, max_chars: int) -> str:
    value = fields.get(name)
    if not isinstance(value, str) or not value.strip():
        raise APIError(400, f"{name}: a non-empty text field is required", param=name, code="missing_field")
    if len(value) > max_chars:
        raise APIError(400, f"{name}: at most {max_chars} characters", param=name, code="invalid_value")
    return value.strip()


def _authorizer(api_key: str | None):
    """A dependency that accepts `Authorization: Bearer <api_key>` (every request when no key is set)."""
    expected = hashlib.sha256(f"Bearer {api_key}".encode()).digest()

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = hashlib.sha256(request.headers.get("authorization", "").encode()).digest()
        # Digests of equal length, compared in constant time.
        if not hmac.compare_digest(given, expected):
            raise APIError(
                401,
                "missing or wrong API key: send Authorization: Bearer <key>",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return authorize


class _CountRequests:
    """Counts every HTTP request by its route and response status."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(getattr(route, "path", "unmatched"), str(status)).inc()
