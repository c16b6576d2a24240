"""Every bad request gets the right status and OpenAI's error envelope, and leaves nothing behind."""

from __future__ import annotations

import base64
import io
import json
import secrets

import numpy as np
import pytest
import soundfile

from csm.cli import main
from tests.product.conftest import speech_like

GOOD = {"model": "csm-1b", "input": "Hello.", "voice": "alloy", "response_format": "pcm", "max_audio_seconds": 0.16}


def _wav(samples: np.ndarray, rate: int = 24_000, subtype: str = "PCM_16", container: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=container, subtype=subtype)
    return buffer.getvalue()


def multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = secrets.token_hex(8)
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts += [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="sample.wav"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in files.items()
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _assert_envelope(status: int, body: bytes, expected: int, param: str | None = None) -> dict:
    assert status == expected, body
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": "   "}, "input"),
        ({"input": "x" * 4097}, "input"),
        ({"input": None}, "input"),
        ({"voice": "nobody"}, "voice"),
        ({"voice": "../../etc/passwd"}, "voice"),
        ({"voice": {"id": "voice_0000000000000000"}}, "voice"),
        ({"voice": 5}, "voice"),
        ({"response_format": "ogg"}, "response_format"),
        ({"speed": 4.5}, "speed"),
        ({"speed": 0.2}, "speed"),
        ({"stream_format": "chunks"}, "stream_format"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": 1e-40}, "temperature"),
        ({"temperature": 6.0}, "temperature"),
        ({"topk": 0}, "topk"),
        ({"max_audio_seconds": -1}, "max_audio_seconds"),
        ({"unknown": 1}, "unknown"),
        ({"context": [{"audio": "not base64!", "text": "Hi."}]}, "context.0.audio"),
        (
            {"context": [{"audio": base64.b64encode(b"plain text, no audio").decode(), "text": "Hi."}]},
            "context.0.audio",
        ),
    ],
)
def test_bad_speech_requests_get_400_naming_the_field(server, change, param):
    request = {key: value for key, value in {**GOOD, **change}.items() if value is not None}
    status, _, body = server.call("POST", "/v1/audio/speech", request)
    _assert_envelope(status, body, 400, param)


def test_a_context_too_long_for_the_model_is_refused_before_any_audio(server):
    clip = base64.b64encode(_wav(speech_like(30.0, seed=1).numpy())).decode()
    request = {**GOOD, "max_audio_seconds": 90, "context": [{"audio": clip, "text": "Words."}] * 3}
    status, _, body = server.call("POST", "/v1/audio/speech", request)
    assert "context too long" in _assert_envelope(status, body, 400)["message"]
    server.wait_idle()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--max-batch", "0"], "--max-batch must be at least 1, got 0"),
        (["--max-queue", "-1"], "--max-queue must be at least 0, got -1"),
        (["--max-voices", "-1"], "--max-voices must be at least 0, got -1"),
        (["--max-request-seconds", "0"], "--max-request-seconds must be at least 0.08 (one frame), got 0.0"),
        (["--max-request-seconds", "nan"], "--max-request-seconds must be at least 0.08 (one frame), got nan"),
    ],
)
def test_serve_options_are_checked_before_anything_loads(capsys, option, message):
    assert main(["serve", *option]) == 2
    assert capsys.readouterr().err.strip() == f"csm: error: {message}"


def test_not_json_and_oversized_bodies(server):
    status, _, body = server.call("POST", "/v1/audio/speech", b"{not json", {"Content-Type": "application/json"})
    _assert_envelope(status, body, 400)
    huge = json.dumps({**GOOD, "input": "x" * (17 * 2**20)}).encode()
    status, _, body = server.call("POST", "/v1/audio/speech", huge, {"Content-Type": "application/json"})
    _assert_envelope(status, body, 413)


def test_unknown_routes_and_methods(server):
    _assert_envelope(*server.call("GET", "/v1/nothing")[::2], 404)
    _assert_envelope(*server.call("GET", "/v1/audio/speech")[::2], 405)
    _assert_envelope(*server.call("DELETE", "/v1/audio/voices/voice_0123456789abcdef")[::2], 404)
    _assert_envelope(*server.call("DELETE", "/v1/audio/voices/..%2F..%2Fetc")[::2], 404)
    _assert_envelope(*server.call("DELETE", "/v1/audio/voices/conversational_a")[::2], 400)


FIELDS = {"name": "A voice", "text": "What it says.", "consent": "cons_1"}


@pytest.mark.parametrize(
    ("fields", "files", "status", "param"),
    [
        ({**FIELDS, "name": ""}, {"audio_sample": "good"}, 400, "name"),
        ({"name": "A voice", "consent": "cons_1"}, {"audio_sample": "good"}, 400, "text"),
        ({"name": "A voice", "text": "Words."}, {"audio_sample": "good"}, 400, "consent"),
        (FIELDS, {}, 400, "audio_sample"),
        (FIELDS, {"audio_sample": "text"}, 400, "audio_sample"),
        (FIELDS, {"audio_sample": "empty"}, 400, "audio_sample"),
        (FIELDS, {"audio_sample": "nan"}, 400, "audio_sample"),
        (FIELDS, {"audio_sample": "corrupt"}, 400, "audio_sample"),
        (FIELDS, {"audio_sample": "long"}, 400, "audio_sample"),
        (FIELDS, {"audio_sample": "large"}, 413, None),
    ],
)
def test_bad_voice_uploads_are_refused_and_leave_nothing(server, fields, files, status, param):
    good = _wav(speech_like(0.5).numpy())
    nan = speech_like(0.5).numpy()
    nan[100] = np.nan
    samples = {
        "good": good,
        "text": b"this is not audio at all" * 40,
        "empty": b"",
        "nan": _wav(nan, subtype="FLOAT"),
        # A FLAC stream header followed by garbage where its frames should be.
        "corrupt": _wav(speech_like(0.5).numpy(), container="FLAC")[:200] + secrets.token_bytes(4000),
        "long": _wav(np.zeros(31 * 8000, dtype=np.float32), rate=8000),
        "large": good + b"\0" * (10 * 2**20),
    }
    before = sorted(server.voices_dir.iterdir()) if server.voices_dir.exists() else []
    body, content_type = multipart(fields, {name: samples[kind] for name, kind in files.items()})
    reply = server.call("POST", "/v1/audio/voices", body, {"Content-Type": content_type})
    _assert_envelope(reply[0], reply[2], status, param)
    assert (sorted(server.voices_dir.iterdir()) if server.voices_dir.exists() else []) == before


def test_uploads_must_be_multipart(server):
    status, _, body = server.call("POST", "/v1/audio/voices", {"name": "x"})
    _assert_envelope(status, body, 415)


def test_a_voice_name_never_becomes_a_path(server):
    body, content_type = multipart(
        {**FIELDS, "name": "../../outside"}, {"audio_sample": _wav(speech_like(0.3).numpy())}
    )
    status, _, reply = server.call("POST", "/v1/audio/voices", body, {"Content-Type": content_type})
    assert status == 200
    voice = json.loads(reply)
    assert voice["name"] == "../../outside"
    assert (server.voices_dir / voice["id"]).is_dir()
    assert not (server.voices_dir.parent.parent / "outside").exists()
    assert server.call("DELETE", f"/v1/audio/voices/{voice['id']}")[0] == 200
