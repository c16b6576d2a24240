"""POST /v1/audio/speech through the real `openai` client against a running `csm serve`."""

from __future__ import annotations

import base64
import json
import threading

import numpy as np
import openai
import pytest

from csm.voices import load_voice
from csm.watermark.stream import CLIP_SAMPLES
from tests.server.audio_checks import FRAME, decode, opus_head

SECONDS = 0.48  # 6 frames: the tiny random model never ends speech early
SAMPLES = 6 * FRAME


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def _speak(client, **fields) -> bytes:
    request = {"model": "csm-1b", "input": "Hello there.", "voice": "alloy", "response_format": "pcm"}
    extra = {
        name: fields.pop(name)
        for name in ("seed", "max_audio_seconds", "stream", "context", "temperature", "topk")
        if name in fields
    }
    return client.audio.speech.create(**{**request, **fields}, extra_body=extra or None).read()


@pytest.mark.parametrize("response_format", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_every_format_decodes_to_24_khz_mono_of_the_expected_length(client, response_format):
    body = _speak(client, response_format=response_format, seed=1, max_audio_seconds=SECONDS)
    rate, channels, samples = decode(body, response_format)
    assert channels == 1 and np.abs(samples).max() > 0.01
    if response_format == "opus":
        # Opus decoders always give 48 kHz; the stream itself says it was made at 24 kHz.
        assert opus_head(body) == (1, 24_000)
        assert (rate, samples.size) == (48_000, 2 * SAMPLES)
    elif response_format in ("mp3", "aac"):
        # Encoder delay and padding: at most two codec frames more.
        assert rate == 24_000 and SAMPLES <= samples.size <= SAMPLES + 2304
    else:
        assert rate == 24_000 and samples.size == SAMPLES


def test_a_seeded_whole_response_equals_generator_generate(client, assets, generator):
    body = _speak(client, voice="conversational_b", response_format="wav", seed=3, max_audio_seconds=0.64, stream=False)
    voice = load_voice("conversational_b", speaker=0, model=assets.model)
    expected = generator.generate("Hello there.", 0, [voice], max_audio_length_ms=640, seed=3)
    _rate, _, samples = decode(body, "wav")
    assert samples.size == expected.numel() == 8 * FRAME
    np.testing.assert_allclose(samples, expected.clamp(-1, 1).numpy(), rtol=0, atol=2 / 32768)


def test_a_whole_response_is_the_streamed_audio_marked_clip_by_clip(client):
    """Whole responses are marked as streams are, a clip at a time (bounded memory), so both
    carry the same audio (a seed gives the same codes; their decoding may round differently by
    a sample's last bit); each clip's marking is checked in test_stream_watermark."""
    fields = {"seed": 12, "max_audio_seconds": 0.64, "speed": 0.5}  # 1.28 s sent: two clips
    streamed = _speak(client, **fields)
    whole = _speak(client, **fields, stream=False)
    assert len(whole) == 2 * 2 * 8 * FRAME > 2 * CLIP_SAMPLES
    assert len(whole) == len(streamed)
    np.testing.assert_allclose(np.frombuffer(whole, "<i2"), np.frombuffer(streamed, "<i2"), rtol=0, atol=2)


def test_whole_responses_carry_duration_and_real_time_factor(server):
    request = {
        "model": "csm-1b",
        "input": "Hi.",
        "voice": "ash",
        "response_format": "pcm",
        "max_audio_seconds": 0.16,
        "stream": False,
    }
    status, headers, body = server.call("POST", "/v1/audio/speech", request)
    assert status == 200 and len(body) == 2 * 2 * FRAME
    assert float(headers["x-audio-duration"]) == pytest.approx(0.16)
    assert float(headers["x-real-time-factor"]) > 0


def test_first_bytes_arrive_while_generation_goes_on_and_leaving_frees_the_slot(client, server):
    with client.audio.speech.with_streaming_response.create(
        model="csm-1b",
        input="A long story.",
        voice="echo",
        response_format="pcm",
        extra_body={"max_audio_seconds": 60, "seed": 4},
    ) as response:
        first = next(response.iter_bytes(chunk_size=None))
        # One watermark clip is out; the rest (up to 60 s) is still being generated.
        assert 0 < len(first) <= 2 * CLIP_SAMPLES
        assert server.engine_stat("active") == 1
    # Leaving the stream disconnects; the engine request is cancelled and its slot freed.
    server.wait_idle()


def test_sse_sends_base64_deltas_then_done_with_usage(server):
    request = {
        "model": "csm-1b",
        "input": "Hi.",
        "voice": "nova",
        "response_format": "pcm",
        "stream_format": "sse",
        "max_audio_seconds": SECONDS,
        "seed": 5,
    }
    status, headers, body = server.call("POST", "/v1/audio/speech", request)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [
        json.loads(line.removeprefix("data: ")) for line in body.decode().splitlines() if line.startswith("data: ")
    ]
    assert [event["type"] for event in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    audio = b"".join(base64.b64decode(event["audio"]) for event in events[:-1])
    assert len(audio) == 2 * SAMPLES
    done = events[-1]
    assert done["type"] == "speech.audio.done"
    assert done["usage"]["output_tokens"] == 6 and done["usage"]["total_tokens"] == 6 + done["usage"]["input_tokens"]


def test_speed_stretches_without_changing_the_rest(client):
    normal = decode(_speak(client, seed=6, max_audio_seconds=SECONDS), "pcm")[2]
    fast = decode(_speak(client, seed=6, max_audio_seconds=SECONDS, speed=2.0), "pcm")[2]
    slow = decode(_speak(client, seed=6, max_audio_seconds=SECONDS, speed=0.5), "pcm")[2]
    assert (normal.size, fast.size, slow.size) == (SAMPLES, SAMPLES // 2, SAMPLES * 2)
    # The same pitch: the strongest frequency moves by less than a bin of the shortest.
    peaks = [np.abs(np.fft.rfft(audio[: SAMPLES // 2])).argmax() for audio in (normal, fast, slow)]
    assert max(peaks) - min(peaks) <= 1


def test_context_turns_and_instructions_are_accepted(client, assets):
    audio = base64.b64encode(assets.voice_audio.read_bytes()).decode()
    context = [{"audio": audio, "text": "Earlier words.", "speaker": 1}]
    body = _speak(client, seed=7, max_audio_seconds=0.16, context=context, instructions="Speak slowly.")
    assert len(body) == 2 * 2 * FRAME


def test_long_input_is_spoken_sentence_by_sentence(client):
    text = " ".join(["This is one sentence of a long text, with a clause or two to make it longer."] * 5)
    body = _speak(client, input=text, seed=8, max_audio_seconds=0.16)
    # Two chunks of at most 250 characters, two frames each.
    assert len(body) == 2 * 2 * 2 * FRAME


def test_eight_concurrent_clients_get_what_each_gets_alone(client):
    requests = [
        {"input": f"Client number {i}.", "voice": "alloy", "seed": 100 + i, "max_audio_seconds": 0.4} for i in range(8)
    ]
    alone = [_speak(client, **dict(request)) for request in requests]
    together: list = [None] * 8

    def run(index: int) -> None:
        try:
            together[index] = _speak(client, **dict(requests[index]))
        except Exception as error:  # noqa: BLE001 - recorded and asserted below
            together[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not [result for result in together if not isinstance(result, bytes)]
    for single, batched in zip(alone, together):
        a, b = (np.frombuffer(body, dtype="<i2").astype(int) for body in (single, batched))
        assert a.size == b.size == 5 * FRAME
        assert np.abs(a - b).max() <= 2


def test_voices_create_then_speak_then_delete(client, server, assets):
    with open(assets.voice_audio, "rb") as sample:
        voice = client.audio.voices.create(
            name="Test voice", audio_sample=sample, consent="cons_test", extra_body={"text": "Some words."}
        )
    assert voice.id.startswith("voice_") and voice.name == "Test voice" and voice.object == "audio.voice"
    listed = [entry["id"] for entry in json.loads(server.call("GET", "/v1/audio/voices")[2])["data"]]
    assert voice.id in listed and "conversational_a" in listed and "alloy" in listed
    assert (server.voices_dir / voice.id / "voice.json").is_file()
    body = _speak(client, voice=voice.id, seed=9, max_audio_seconds=0.16)
    assert len(body) == 2 * 2 * FRAME
    status, _, reply = server.call("DELETE", f"/v1/audio/voices/{voice.id}")
    assert status == 200 and json.loads(reply)["deleted"] is True
    assert not (server.voices_dir / voice.id).exists()
    assert server.call("POST", "/v1/audio/speech", {"model": "m", "input": "Hi.", "voice": voice.id})[0] == 400


def test_models_and_health(server):
    status, _, body = server.call("GET", "/v1/models")
    assert status == 200 and [model["id"] for model in json.loads(body)["data"]] == ["csm-1b"]
    assert json.loads(server.call("GET", "/health")[2]) == {"status": "ok"}


def test_metrics_count_requests_and_audio(server):
    server.call("GET", "/v1/models")
    text = server.call("GET", "/metrics")[2].decode()
    assert 'csm_requests_total{route="/v1/models",status="200"}' in text
    assert "csm_time_to_first_audio_seconds_count" in text
    audio = [line for line in text.splitlines() if line.startswith("csm_audio_seconds_total ")]
    assert audio and float(audio[0].split()[1]) > 0
    for gauge in ("queue_length", "active", "frames_per_second"):
        assert f"csm_engine_{gauge} " in text
