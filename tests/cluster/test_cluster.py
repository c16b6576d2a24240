"""csm.cluster on a real local Ray cluster, called as users call `csm serve`: the `openai`
client and plain HTTP through Serve's proxy. The replica is killed last: the tests before it
share the two replicas the session started."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import soundfile

from tests.cluster.conftest import API_KEY, REPLICAS, WAITING, Cluster
from tests.product.conftest import speech_like

SPEECH = {"model": "csm-1b", "input": "Hello from the cluster.", "response_format": "pcm"}
SHORT = {"seed": 3, "max_audio_seconds": 0.4}
# Long enough to hold a row while the test does something else (rows are freed when it is closed).
LONG = {"seed": 5, "max_audio_seconds": 90}


def _client(cluster: Cluster, key: str = API_KEY, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key=key, max_retries=retries, timeout=120)


def _speak(cluster: Cluster, voice: str, **extra) -> tuple[str, bytes]:
    """(serving replica, audio) of one whole request."""
    response = _client(cluster).audio.speech.with_raw_response.create(
        **SPEECH, voice=voice, extra_body={**SHORT, **extra}
    )
    return response.headers["x-csm-replica"], response.content


def _ids(cluster: Cluster) -> set[str]:
    return {replica["id"] for replica in cluster.health()[1]["replicas"]}


def _open_stream(cluster: Cluster, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A speech request whose response has started (its headers are in) and is left unread."""
    connection = http.client.HTTPConnection("127.0.0.1", cluster.port, timeout=120)
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    connection.request("POST", "/v1/audio/speech", body=json.dumps(body), headers=headers)
    return connection, connection.getresponse()


def test_health_lists_the_ready_replicas(cluster):
    status, body = cluster.health()
    assert status == 200 and body["status"] == "ok" and body["ready"] == REPLICAS
    assert len({replica["id"] for replica in body["replicas"]}) == REPLICAS
    assert all(replica["failure"] is None for replica in body["replicas"])


def test_whole_speech_says_which_replica_made_it(cluster):
    response = _client(cluster).audio.speech.with_raw_response.create(
        **{**SPEECH, "response_format": "wav"}, voice="alloy", extra_body={**SHORT, "stream": False}
    )
    audio, rate = soundfile.read(io.BytesIO(response.content))
    assert rate == 24_000 and 0 < len(audio) <= 0.4 * 24_000
    assert float(response.headers["x-audio-duration"]) == pytest.approx(len(audio) / 24_000, abs=1e-3)
    assert response.headers["x-csm-replica"] in _ids(cluster)


def test_streamed_speech_is_the_same_audio_as_whole(cluster):
    """The same seed gives the same audio, streamed or whole, whichever replica makes it."""
    with _client(cluster).audio.speech.with_streaming_response.create(
        **SPEECH, voice="echo", extra_body=SHORT
    ) as response:
        assert response.headers["x-csm-replica"] in _ids(cluster)
        streamed = b"".join(response.iter_bytes())
    _, whole = _speak(cluster, "echo", stream=False)
    assert len(streamed) == len(whole) > 0
    # A seed gives the same codes; their decoding may round differently by a unit or two (as in tests/server).
    np.testing.assert_allclose(np.frombuffer(whole, "<i2"), np.frombuffer(streamed, "<i2"), rtol=0, atol=2)


def test_sse_sends_deltas_then_done_with_usage(cluster):
    status, headers, body = cluster.call(
        "POST", "/v1/audio/speech", {**SPEECH, "voice": "sage", **SHORT, "stream_format": "sse"}
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers["x-csm-replica"] in _ids(cluster)
    events = [json.loads(line.removeprefix("data: ")) for line in body.decode().split("\n\n") if line]
    assert [event["type"] for event in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    audio = b"".join(base64.b64decode(event["audio"]) for event in events[:-1])
    done = events[-1]
    assert done["type"] == "speech.audio.done" and audio
    assert done["usage"]["output_tokens"] == -(-len(audio) // 2 // 1920)
    assert done["usage"]["total_tokens"] == done["usage"]["input_tokens"] + done["usage"]["output_tokens"] > 0


def test_a_wrong_key_is_401_and_the_page_needs_none(cluster):
    with pytest.raises(openai.AuthenticationError) as raised:
        _client(cluster, key="wrong").audio.speech.create(**SPEECH, voice="alloy", extra_body=SHORT)
    assert raised.value.status_code == 401 and raised.value.body["code"] == "invalid_api_key"
    assert cluster.call("GET", "/v1/models", key=None)[0] == 401
    assert cluster.call("GET", "/", key=None)[0] == 200


def test_requests_in_one_voice_go_to_one_replica(cluster):
    """Serve's multiplexing on the voice id: once a replica holds a voice (its prompt cached in
    its engine), the router sends that voice there."""
    first, _ = _speak(cluster, "coral")
    time.sleep(2)  # the replica's voices reach the router through Serve's controller
    assert {_speak(cluster, "coral", seed=seed)[0] for seed in (6, 7, 8)} == {first}


def test_an_uploaded_voice_is_spoken_by_both_replicas(cluster, tmp_path):
    """Uploaded through the ingress, read by each replica from the shared folder; two requests
    at once in that voice take the replica that holds it and, while it is busy, the other."""
    sample = tmp_path / "ann.wav"
    soundfile.write(sample, speech_like(0.3, seed=9).numpy(), 24_000)
    with open(sample, "rb") as audio_sample:
        voice = _client(cluster).audio.voices.create(
            name="Ann", audio_sample=audio_sample, consent="cons_ann", extra_body={"text": "What Ann says."}
        )
    assert voice.id.startswith("voice_") and (cluster.voices_dir / voice.id / "audio.wav").is_file()
    listed = json.loads(cluster.call("GET", "/v1/audio/voices")[2])["data"]
    assert voice.id in {entry["id"] for entry in listed}
    # Two long requests at once: each replica has 2 rows, so both fit on the one holding the voice
    # only if the other is idle; holding a row on each replica with a third makes them spread.
    streams = [_open_stream(cluster, {**SPEECH, "voice": voice.id, **LONG, "seed": seed}) for seed in (1, 2, 3)]
    try:
        assert all(response.status == 200 for _, response in streams)
        assert {response.getheader("x-csm-replica") for _, response in streams} == _ids(cluster)
    finally:
        for connection, _ in streams:
            connection.close()
    status, _, body = cluster.call("DELETE", f"/v1/audio/voices/{voice.id}")
    assert status == 200 and json.loads(body)["deleted"] is True
    for seed in (1, 2, 3, 4):  # deletion reaches the replicas that held it
        with pytest.raises(openai.BadRequestError) as raised:
            _speak(cluster, voice.id, seed=seed)
        assert raised.value.body["code"] == "voice_not_found"


def test_four_concurrent_requests_are_served_across_the_replicas(cluster):
    cluster_client = _client(cluster)

    def one(seed: int) -> tuple[str, int]:
        response = cluster_client.audio.speech.with_raw_response.create(
            **SPEECH, voice="verse", extra_body={**SHORT, "seed": seed, "max_audio_seconds": 2}
        )
        return response.headers["x-csm-replica"], len(response.content)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert all(size > 0 for _, size in results)
    assert {replica for replica, _ in results} <= _ids(cluster)


def test_a_full_cluster_answers_429_with_retry_after(cluster):
    """Four rows busy and four requests waiting at the ingress: the next is refused, not queued."""
    busy = [_open_stream(cluster, {**SPEECH, "voice": "nova", **LONG, "seed": seed}) for seed in range(4)]
    statuses: list[int] = []

    def wait(seed: int) -> None:
        statuses.append(cluster.call("POST", "/v1/audio/speech", {**SPEECH, "voice": "nova", **SHORT, "seed": seed})[0])

    waiters = [threading.Thread(target=wait, args=(seed,)) for seed in range(WAITING)]
    try:
        assert all(response.status == 200 for _, response in busy)
        for waiter in waiters:
            waiter.start()
        time.sleep(1)  # the waiters are queued at the ingress
        status, headers, body = cluster.call("POST", "/v1/audio/speech", {**SPEECH, "voice": "nova", **SHORT})
        assert status == 429, body
        assert headers["retry-after"] == "1" and json.loads(body)["error"]["code"] == "queue_full"
        assert statuses == []  # nobody waiting was refused or served meanwhile
    finally:
        for connection, _ in busy:
            connection.close()
    for waiter in waiters:
        waiter.join(timeout=120)
    assert statuses == [200] * WAITING  # served once rows were free


def test_metrics_hold_each_replicas_engine_figures(cluster):
    status, _, body = cluster.call("GET", "/metrics")
    assert status == 200
    lines = body.decode().splitlines()
    for replica in _ids(cluster):
        assert any(line.startswith(f'csm_engine_max_batch{{replica="{replica}"}} 2.0') for line in lines)
        assert any(line.startswith(f'csm_engine_frames_generated{{replica="{replica}"}}') for line in lines)
    assert any(line.startswith('csm_requests_total{route="/v1/audio/speech",status="200"}') for line in lines)


def test_a_killed_replica_is_replaced_and_its_stream_ends_with_an_error(cluster, tmp_path):
    """SIGKILL the replica two streams come from: the SSE one ends with speech.audio.error and
    the raw one is cut (not a hang, not a body that looks whole), later requests succeed, stored
    voices still work, and Serve brings the count back."""
    sample = tmp_path / "bo.wav"
    soundfile.write(sample, speech_like(0.3, seed=10).numpy(), 24_000)
    with open(sample, "rb") as audio_sample:
        voice = _client(cluster).audio.voices.create(
            name="Bo", audio_sample=audio_sample, consent="cons_bo", extra_body={"text": "What Bo says."}
        )
    connection, response = _open_stream(cluster, {**SPEECH, "voice": "alloy", **LONG, "stream_format": "sse"})
    raw_connection, raw = _open_stream(cluster, {**SPEECH, "voice": "alloy", **LONG})  # same voice, same replica
    try:
        assert response.status == raw.status == 200
        victim = response.getheader("x-csm-replica")
        assert raw.getheader("x-csm-replica") == victim
        pid = next(replica["pid"] for replica in cluster.health()[1]["replicas"] if replica["id"] == victim)
        os.kill(pid, signal.SIGKILL)
        events = [json.loads(line.removeprefix("data: ")) for line in response.read().decode().split("\n\n") if line]
        with pytest.raises(http.client.IncompleteRead):  # raw audio: the body is cut, never ended as if whole
            raw.read()
    finally:
        connection.close()
        raw_connection.close()
    assert events[-1]["type"] == "speech.audio.error"
    assert events[-1]["error"]["code"] == "replica_lost" and victim in events[-1]["error"]["message"]
    for seed in (1, 2, 3):  # the survivor serves at once
        replica, audio = _speak(cluster, voice.id, seed=seed)
        assert audio and replica != victim
    deadline = time.monotonic() + 300
    while victim in _ids(cluster):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    body = cluster.wait_for_replicas(REPLICAS)
    assert victim not in {replica["id"] for replica in body["replicas"]}
    replicas = {_speak(cluster, voice.id, seed=seed)[0] for seed in range(4, 8)}
    assert replicas and victim not in replicas
