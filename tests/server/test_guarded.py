"""A server with an API key, one slot and a queue of one: auth, 429, disconnects, restarts."""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import openai
import pytest

from tests.server.conftest import start_server
from tests.server.test_bad_input import multipart
from tests.server.test_speech import SAMPLES

KEY = "test-key-0123"
ORIGIN = "http://page.example"
LONG = {
    "model": "csm-1b",
    "input": "A long story.",
    "voice": "alloy",
    "response_format": "pcm",
    "max_audio_seconds": 60,
}


@pytest.fixture(scope="module")
def guarded(assets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("guarded")
    servers = [
        start_server(
            assets,
            folder,
            "--max-batch",
            "1",
            "--max-queue",
            "1",
            "--no-watermark",
            "--cors-origin",
            ORIGIN,
            api_key=KEY,
        )
    ]
    # A test may restart the server on the same folder; the last one is stopped here.
    yield servers
    assert servers[-1].stop() in (0, 130), servers[-1].log.read_text()


def test_every_endpoint_but_health_needs_the_key(guarded):
    server = guarded[-1]
    assert server.call("GET", "/health", key=None)[0] == 200
    for method, path in [
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
        ("GET", "/v1/audio/voices"),
        ("POST", "/v1/audio/speech"),
    ]:
        for key in (None, "wrong", KEY + "x", ""):
            status, _, body = server.call(method, path, {} if method == "POST" else None, key=key)
            assert status == 401, (method, path, key)
            assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert server.call("GET", "/v1/models")[0] == 200
    assert "API key: required" in server.log.read_text()


def test_cors_lets_the_named_origin_in_and_no_other(guarded, server):
    """A browser's preflight carries no key; the real request still needs one."""
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    status, headers, _ = guarded[-1].call("OPTIONS", "/v1/audio/speech", headers=preflight, key=None)
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in headers["access-control-allow-headers"].lower()
    status, headers, _ = guarded[-1].call("GET", "/v1/models", headers={"Origin": ORIGIN})
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    status, headers, _ = guarded[-1].call("GET", "/v1/models", headers={"Origin": ORIGIN}, key=None)
    assert status == 401 and headers["access-control-allow-origin"] == ORIGIN
    status, headers, _ = guarded[-1].call("GET", "/v1/models", headers={"Origin": "http://other.example"})
    assert status == 200 and "access-control-allow-origin" not in headers
    # Without --cors-origin, no origin is let in.
    status, headers, _ = server.call("GET", "/v1/models", headers={"Origin": ORIGIN})
    assert status == 200 and "access-control-allow-origin" not in headers


def test_the_openai_client_sends_the_key(guarded):
    client = openai.OpenAI(base_url=f"{guarded[-1].url}/v1", api_key=KEY, max_retries=0, timeout=300)
    body = client.audio.speech.create(
        model="csm-1b",
        input="Hi.",
        voice="ash",
        response_format="pcm",
        extra_body={"max_audio_seconds": 0.48, "seed": 1},
    ).read()
    assert len(body) == 2 * SAMPLES
    wrong = openai.OpenAI(base_url=f"{guarded[-1].url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def _open_stream(server, seed: int):
    connection = server.connection()
    connection.request(
        "POST",
        "/v1/audio/speech",
        json.dumps({**LONG, "seed": seed}),
        {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    response = connection.getresponse()
    assert response.status == 200
    return connection, response


def test_a_full_queue_answers_429_with_retry_after_and_leaving_frees_the_slots(guarded):
    server = guarded[-1]
    running, response = _open_stream(server, 1)
    assert response.read1(65536)  # generating in the only slot
    # In the queue of one: admitted, its headers wait for its first audio.
    waiting = server.connection()
    waiting.request("POST", "/v1/audio/speech", json.dumps({**LONG, "seed": 2}),
                    {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
    deadline = time.monotonic() + 30
    while server.engine_stat("queue_length") < 1:
        assert time.monotonic() < deadline, "the second request never queued"
        time.sleep(0.1)
    status, headers, body = server.call("POST", "/v1/audio/speech", {**LONG, "seed": 3})
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert json.loads(body)["error"]["type"] == "rate_limit_error"
    running.close()
    waiting.close()
    server.wait_idle()
    assert server.call("POST", "/v1/audio/speech", {**LONG, "max_audio_seconds": 0.16})[0] == 200


def test_voices_survive_a_restart_and_shutdown_ends_running_streams(guarded, assets):
    server = guarded[-1]
    body, content_type = multipart(
        {"name": "Kept", "text": "Some words.", "consent": "cons_1"}, {"audio_sample": assets.voice_audio.read_bytes()}
    )
    status, _, reply = server.call("POST", "/v1/audio/voices", body, {"Content-Type": content_type})
    assert status == 200
    voice = json.loads(reply)
    request = {**LONG, "voice": voice["id"], "max_audio_seconds": 0.48, "seed": 4}
    before = server.call("POST", "/v1/audio/speech", request)[2]

    stream, response = _open_stream(server, 5)
    assert response.read1(65536)
    assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    stream.close()
    assert "Shutting down" in server.log.read_text()

    restarted = start_server(
        assets, server.log.parent, "--max-batch", "1", "--max-queue", "1", "--no-watermark", api_key=KEY
    )
    guarded.append(restarted)
    listed = json.loads(restarted.call("GET", "/v1/audio/voices")[2])["data"]
    assert [entry for entry in listed if entry["id"] == voice["id"]] == [voice]
    again = restarted.call("POST", "/v1/audio/speech", request)[2]
    # The same seed gives the same codes; their decoded audio may differ by a rounding step in
    # another process (CPU kernels' float sums; see "What a seed guarantees" in docs/server.md).
    a, b = (np.frombuffer(body, dtype="<i2").astype(int) for body in (before, again))
    assert a.size == b.size == 6 * 1920 and np.abs(a - b).max() <= 2
