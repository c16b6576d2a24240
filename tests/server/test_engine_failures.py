"""Engine failures as clients see them, through uvicorn on loopback and the `openai` client.

The server runs in this process (a real uvicorn on a free port) so that a fault can be put
into the engine's worker: a frame that fails (GenerationError, as non-finite logits do) fails
its request alone; a worker that dies makes every request a 503 and /health say why.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
import time

import openai
import pytest
import uvicorn

from csm import batching
from csm.engine import Engine
from csm.errors import GenerationError
from csm.server.app import create_app
from csm.server.backend import LocalBackend
from csm.server.speech import SpeechService
from csm.server.voices import Voices, VoiceStore
from csm.watermark.stream import FRAME_SAMPLES
from tests.server.conftest import Server, free_port

MAX_AHEAD_S, CLIENT_TIMEOUT_S = 0.16, 1.0
REQUEST = {"model": "csm-1b", "input": "Hello.", "voice": "alloy", "response_format": "pcm"}


class Boom(BaseException):
    """Not an Exception: nothing in an engine turn catches it, so the worker dies of it."""


@pytest.fixture
def live(generator, tmp_path, request):  # noqa: F811
    """A server on its own engine (options: the test's indirect parameter), in a thread of this process."""
    engine = Engine(generator, max_batch=2, max_queue=2, **getattr(request, "param", {}))
    service = SpeechService(engine, generator, Voices({}, VoiceStore(tmp_path / "voices")), None)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(LocalBackend(service)), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield Server(port, None, tmp_path / "no.log", tmp_path / "voices"), engine
    server.should_exit = True
    thread.join(timeout=30)
    engine.close()


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _fail(monkeypatch, method: str, error: BaseException, on_call: int) -> None:
    """The worker's `on_call`-th call of `batching.CacheRows.<method>` raises `error` (sample: the
    depth decoder's pass, which makes every frame; advance: the backbone's step after the first)."""
    real = getattr(batching.CacheRows, method)
    calls = []

    def failing(batch, *args):
        calls.append(1)
        if len(calls) == on_call:
            raise error
        return real(batch, *args)

    monkeypatch.setattr(batching.CacheRows, method, failing)


def test_a_frame_that_fails_fails_its_request_alone(live, monkeypatch):
    server, engine = live
    client = _client(server)
    _fail(monkeypatch, "sample", GenerationError("non-finite logits in frame 1"), on_call=1)
    with pytest.raises(openai.InternalServerError) as raised:
        client.audio.speech.create(**REQUEST, extra_body={"max_audio_seconds": 0.24, "seed": 1})
    assert raised.value.status_code == 500
    assert raised.value.body["code"] == "generation_failed" and "non-finite" in raised.value.body["message"]
    audio = client.audio.speech.create(**REQUEST, extra_body={"max_audio_seconds": 0.16, "seed": 2}).read()
    assert len(audio) == 2 * 2 * FRAME_SAMPLES and engine.failure is None


def test_a_failure_mid_stream_is_an_sse_error_event_or_a_cut_body(live, monkeypatch):
    server, _ = live
    request = {**REQUEST, "max_audio_seconds": 0.8, "seed": 3}
    _fail(monkeypatch, "advance", GenerationError("non-finite logits"), on_call=3)
    status, _, body = server.call("POST", "/v1/audio/speech", {**request, "stream_format": "sse"})
    events = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]
    assert status == 200 and events[0]["type"] == "speech.audio.delta"
    assert events[-1]["type"] == "speech.audio.error" and events[-1]["error"]["code"] == "generation_failed"
    _fail(monkeypatch, "advance", GenerationError("non-finite logits"), on_call=3)
    with pytest.raises(http.client.IncompleteRead) as cut:
        server.call("POST", "/v1/audio/speech", request)
    # Raw audio cannot carry an error: its body is cut after the same frames (no last chunk), so
    # no client takes it for a whole, shorter file.
    sent = sum(len(base64.b64decode(event["audio"])) for event in events[:-1])
    assert len(cut.value.partial) == sent < 2 * 10 * FRAME_SAMPLES and sent % (2 * FRAME_SAMPLES) == 0
    assert len(_client(server).audio.speech.create(**REQUEST, extra_body={"max_audio_seconds": 0.16}).read()) > 0


def test_a_dead_worker_makes_every_request_503_and_health_says_why(live, monkeypatch):
    server, engine = live
    client = _client(server)
    assert server.call("GET", "/health")[0] == 200
    _fail(monkeypatch, "sample", Boom("the device is gone"), on_call=1)
    with pytest.raises(openai.InternalServerError) as raised:
        client.audio.speech.create(**REQUEST, extra_body={"max_audio_seconds": 0.24, "seed": 4})
    assert raised.value.status_code == 503 and raised.value.body["code"] == "engine_failed"
    assert "the device is gone" in raised.value.body["message"]
    assert isinstance(engine.failure, Boom)
    for stream in (True, False):  # later requests fail at once, streamed or whole
        with pytest.raises(openai.InternalServerError) as raised:
            client.audio.speech.create(**REQUEST, extra_body={"max_audio_seconds": 0.16, "stream": stream})
        assert raised.value.status_code == 503
    status, _, body = server.call("GET", "/health")
    assert status == 503 and "Boom: the device is gone" in json.loads(body)["reason"]


@pytest.mark.parametrize("live", [{"max_ahead_s": MAX_AHEAD_S, "client_timeout_s": CLIENT_TIMEOUT_S}], indirect=True)
def test_a_reader_that_stops_reading_is_cut_off_and_another_is_served(live):
    """Its audio fills the sockets' buffers, then runs `max_ahead_s` ahead in the engine; its row
    waits, and after `client_timeout_s` it is cancelled, the client still connected."""
    server, engine = live
    # Slowed down and base64'd, each 80 ms frame is ~20 kB on the wire: the buffers fill sooner.
    body = json.dumps({**REQUEST, "max_audio_seconds": 60, "seed": 5, "speed": 0.25, "stream_format": "sse"})
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    slow.settimeout(60)
    slow.connect(("127.0.0.1", server.port))
    head = f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    slow.sendall(f"{head}\r\n\r\n{body}".encode())
    assert slow.recv(1024).startswith(b"HTTP/1.1 200")  # then reads nothing more
    started = time.monotonic()
    other = _client(server).audio.speech.create(**REQUEST, extra_body={"max_audio_seconds": 0.16, "seed": 6}).read()
    assert len(other) == 2 * 2 * FRAME_SAMPLES
    deadline = time.monotonic() + 240
    while not engine.stats()["requests_timed_out"]:
        assert time.monotonic() < deadline, f"the slow reader was never cut off: {engine.stats()}"
        time.sleep(0.2)
    stats = engine.stats()
    print(f"faults: a reader that stopped reading was cut off after {time.monotonic() - started:.0f} s, "
          f"{stats['frames_generated']} frames made in all")  # fmt: skip
    assert stats["active"] == 0 and stats["waiting_for_readers"] == 0
    slow.close()
