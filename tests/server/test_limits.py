"""Hostile and broken input against a real server: refused with OpenAI's envelope, nothing stored,
no file of the server's read, memory and open files flat; and the per-request and voice limits."""

from __future__ import annotations

import base64
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest

from csm.generator import Segment
from csm.server.speech import trim_history
from csm.server.voices import CACHED_VOICES, VoiceLimitError, Voices, VoiceStore
from csm.watermark.stream import FRAME_SAMPLES
from tests.product.conftest import speech_like
from tests.server.conftest import start_server
from tests.server.corpus import SECRET, bad_speech_bodies, broken_uploads, unsafe_uploads
from tests.server.test_bad_input import _wav, multipart

MAX_VOICES = 2
MAX_REQUEST_SECONDS = 0.48  # six frames
GOOD = {"model": "csm-1b", "input": "Hello.", "voice": "alloy", "response_format": "pcm", "max_audio_seconds": 0.16}
VOICE_FIELDS = {"name": "A voice", "text": "What it says.", "consent": "cons_1"}
# Resident memory may move this much over the whole corpus (allocator noise, not growth).
RSS_SLACK_MB = 40


@pytest.fixture(scope="module")
def strict(assets, tmp_path_factory):
    """Small limits, no queue, and a secret file in the server's working directory."""
    folder = tmp_path_factory.mktemp("strict")
    workdir = folder / "cwd"
    workdir.mkdir()
    (workdir / SECRET).write_bytes(_wav(speech_like(1.0, seed=9).numpy()))
    server = start_server(
        assets, folder, "--max-voices", str(MAX_VOICES), "--max-request-seconds", str(MAX_REQUEST_SECONDS),
        "--max-batch", "2", "--max-queue", "0", "--no-watermark", cwd=workdir,
    )  # fmt: skip
    yield server
    assert server.stop() in (0, 130), server.log.read_text()


def _stored(server) -> list[str]:
    return sorted(path.name for path in server.voices_dir.iterdir()) if server.voices_dir.exists() else []


def _upload(server, data: bytes, fields: dict = VOICE_FIELDS):
    body, content_type = multipart(fields, {"audio_sample": data})
    return server.call("POST", "/v1/audio/voices", body, {"Content-Type": content_type})


def _refused(status: int, body: bytes, what: str) -> dict:
    assert 400 <= status < 500, f"{what}: {status} {body[:300]!r}"
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], what
    return error


def _audio_seconds(server) -> float:
    text = server.call("GET", "/metrics")[2].decode()
    return float(next(line for line in text.splitlines() if line.startswith("csm_audio_seconds_total ")).split()[1])


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("kind", sorted(unsafe_uploads()))
def test_playlists_concat_scripts_and_images_are_refused_as_voices_and_as_context(strict, kind):
    data = unsafe_uploads()[kind]
    before = _stored(strict)
    status, _, body = _upload(strict, data)
    assert _refused(status, body, kind)["param"] == "audio_sample"
    assert _stored(strict) == before
    context = [{"audio": base64.b64encode(data).decode(), "text": "Earlier.", "speaker": 1}]
    status, _, body = strict.call("POST", "/v1/audio/speech", {**GOOD, "context": context})
    assert _refused(status, body, kind)["param"] == "context.0.audio"


def test_a_corpus_of_broken_uploads_and_bodies_is_refused_with_memory_and_files_flat(strict):
    uploads = list(broken_uploads().items())
    bodies = list(bad_speech_bodies(GOOD))
    big = ("big-noise", os.urandom(3 * 2**20))  # spooled to a temporary file by the form parser: closed?
    warm_up = uploads[:30] + bodies[:30] + [big]
    stored = _stored(strict)
    pid = strict.process.pid

    def send_all(upload_cases, body_cases) -> None:
        for name, data in upload_cases:
            status, _, body = _upload(strict, data)
            _refused(status, body, name)
        for name, data in body_cases:
            status, _, body = strict.call("POST", "/v1/audio/speech", data, {"Content-Type": "application/json"})
            _refused(status, body, name)

    send_all(warm_up, [])
    before, files_before = _rss_mb(pid), _open_files(pid)
    started = time.monotonic()
    send_all([*uploads, *[big] * 4], bodies)
    # Context audio goes through the same decoder: a slice of the corpus as context too.
    for name, data in uploads[::7]:
        context = [{"audio": base64.b64encode(data).decode(), "text": "Earlier."}]
        status, _, body = strict.call("POST", "/v1/audio/speech", {**GOOD, "context": context})
        _refused(status, body, f"context {name}")
    wall = time.monotonic() - started
    after, files_after = _rss_mb(pid), _open_files(pid)
    print(
        f"fuzz: {len(uploads) + 4} uploads, {len(bodies)} bodies, {len(uploads[::7])} contexts in {wall:.1f} s, "
        f"all 4xx; RSS {before:.0f} -> {after:.0f} MB; open files {files_before} -> {files_after}"
    )
    assert _stored(strict) == stored
    assert after - before < RSS_SLACK_MB
    assert files_after <= files_before + 1  # the four big ones' temporary files are closed
    assert "Traceback" not in strict.log.read_text()
    assert strict.call("GET", "/health")[0] == 200


def test_a_request_makes_at_most_max_request_seconds_of_audio_in_all(strict):
    # Three chunks (each sentence is too long to share one) of up to four frames each: twelve
    # frames uncapped, cut at six; the third chunk never runs.
    sentence = "This sentence is long enough that no other sentence fits beside it in one chunk of text, " * 2
    text = " ".join(f"{sentence.strip()} Number {index}." for index in range(3))
    request = {**GOOD, "input": text, "max_audio_seconds": 0.32, "seed": 1}
    cap = round(MAX_REQUEST_SECONDS * 24_000)
    streamed = strict.call("POST", "/v1/audio/speech", request)
    whole = strict.call("POST", "/v1/audio/speech", {**request, "stream": False})
    assert streamed[0] == whole[0] == 200
    assert len(streamed[2]) == len(whole[2]) == 2 * cap
    assert float(whole[1]["x-audio-duration"]) == pytest.approx(MAX_REQUEST_SECONDS)
    assert whole[1]["x-audio-truncated"] == "max-request-seconds"
    # Slower speech is cut so that what is sent stays within the cap too.
    made_before = _audio_seconds(strict)
    slow = strict.call("POST", "/v1/audio/speech", {**request, "speed": 0.5})
    assert slow[0] == 200 and len(slow[2]) == 2 * cap
    # The metric counts what the model made (three frames), not the stretched samples sent.
    assert _audio_seconds(strict) - made_before == pytest.approx(MAX_REQUEST_SECONDS / 2)
    sse = strict.call("POST", "/v1/audio/speech", {**request, "stream_format": "sse", "speed": 0.5})
    done = json.loads(sse[2].decode().strip().splitlines()[-1].removeprefix("data: "))
    # Usage counts the frames the model made (three), not the stretched samples sent.
    assert done["type"] == "speech.audio.done" and done["usage"]["output_tokens"] == 3
    assert "request cut at --max-request-seconds" in strict.log.read_text()
    strict.wait_idle()


def test_uploads_past_max_voices_are_refused_and_store_nothing(strict, assets):
    sample = assets.voice_audio.read_bytes()
    for voice in json.loads(strict.call("GET", "/v1/audio/voices")[2])["data"]:
        if voice["kind"] == "stored":
            strict.call("DELETE", f"/v1/audio/voices/{voice['id']}")
    kept = []
    for _ in range(MAX_VOICES):
        status, _, body = _upload(strict, sample)
        assert status == 200, body
        kept.append(json.loads(body)["id"])
    stored = _stored(strict)
    status, _, body = _upload(strict, sample)
    assert _refused(status, body, "past --max-voices")["code"] == "too_many_voices"
    assert _stored(strict) == stored == sorted(kept)
    assert strict.call("DELETE", f"/v1/audio/voices/{kept[0]}")[0] == 200
    status, _, body = _upload(strict, sample)
    assert status == 200, body
    for voice_id in (kept[1], json.loads(body)["id"]):
        assert strict.call("DELETE", f"/v1/audio/voices/{voice_id}")[0] == 200


def test_a_burst_past_a_queue_of_zero_gets_429_and_the_rest_run(strict):
    """--max-queue 0 is accepted: two rows, no waiting; the third and fourth at once get 429."""
    from concurrent.futures import ThreadPoolExecutor

    request = {**GOOD, "input": "A burst.", "max_audio_seconds": 0.32}
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda seed: strict.call("POST", "/v1/audio/speech", {**request, "seed": seed}), range(4)))
    statuses = sorted(status for status, _, _ in replies)
    assert set(statuses) == {200, 429} and statuses.count(200) >= 2, statuses
    for status, headers, body in replies:
        if status == 429:
            assert int(headers["retry-after"]) >= 1 and json.loads(body)["error"]["type"] == "rate_limit_error"
        else:
            assert len(body) == 2 * 4 * FRAME_SAMPLES
    strict.wait_idle()


def test_stored_voices_stay_on_disk_and_only_a_few_in_memory(tmp_path):
    store = VoiceStore(tmp_path, max_voices=CACHED_VOICES + 4)
    ids = [store.add(f"v{i}", "Words.", speech_like(0.1, seed=i)).id for i in range(CACHED_VOICES + 4)]
    with pytest.raises(VoiceLimitError):
        store.add("one too many", "Words.", speech_like(0.1))
    reopened = VoiceStore(tmp_path, max_voices=100)
    assert [voice.id for voice in reopened.list()] == [voice.id for voice in store.list()]
    assert reopened.cached() == 0  # listing and starting read metadata only
    voices = Voices({}, reopened)
    for index, voice_id in enumerate(ids):
        audio = voices.resolve(voice_id).prompts[0].audio
        np.testing.assert_array_equal(audio.numpy(), speech_like(0.1, seed=index).numpy())
    assert reopened.cached() == CACHED_VOICES


def test_a_voice_half_written_when_the_server_died_is_gone_at_the_next_start(tmp_path):
    store = VoiceStore(tmp_path)
    kept = store.add("kept", "Words.", speech_like(0.2)).id
    half = tmp_path / ".incoming-voice_00000000000000ff"
    half.mkdir()
    (half / "audio.wav").write_bytes(b"RIFF")
    reopened = VoiceStore(tmp_path)
    assert [voice.id for voice in reopened.list()] == [kept]
    assert sorted(path.name for path in tmp_path.iterdir()) == [kept]


def test_history_keeps_only_what_could_still_fit_in_a_prompt():
    seconds, limit = 10.0, 2047
    history = [Segment(0, f"Chunk {i}.", speech_like(seconds, seed=i)) for i in range(40)]
    newest = history[-1]
    trim_history(history, limit)
    positions = sum(math.ceil(segment.audio.numel() / FRAME_SAMPLES) + 1 for segment in history)
    # As many of the newest as fit, and not one more.
    assert history[-1] is newest and positions <= limit < positions + math.ceil(seconds * 12.5) + 1
