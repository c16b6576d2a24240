"""A fixed, seeded corpus of hostile or broken uploads and JSON bodies: every one must be refused.

Each upload is invalid by construction (no entry is a playable clip of speech): files that
would make FFmpeg read other files (playlists, concat scripts, SDP), images, files cut
inside their header, streams with no samples, absurd sample rates and channel counts,
video without audio, headers that claim gigabytes, random bytes behind real magic
numbers, and audio too long or not finite.
"""

from __future__ import annotations

import fractions
import io
import json
import random
import struct
from collections.abc import Iterator

import av
import numpy as np
import soundfile

SECRET = "secret.wav"  # a real file in the server's working directory
SEED = 17


def unsafe_uploads() -> dict[str, bytes]:
    """Inputs whose demuxers open other files or URLs, or treat the input as an image."""
    return {
        "ffconcat": f"ffconcat version 1.0\nfile {SECRET}\n".encode(),
        "ffconcat-quoted": f"ffconcat version 1.0\nfile '{SECRET}'\nduration 1.0\n".encode(),
        "concat-style": f"file '{SECRET}'\nfile '{SECRET}'\n".encode(),
        "concat-protocol": f"concat:{SECRET}|{SECRET}".encode(),
        "hls": f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{SECRET}\n#EXT-X-ENDLIST\n".encode(),
        "hls-url": b"#EXTM3U\n#EXTINF:1.0,\nhttp://127.0.0.1:9/a.wav\n#EXT-X-ENDLIST\n",
        "sdp": b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=audio 5004 RTP/AVP 0\n",
        "dash": f'<?xml version="1.0"?><MPD xmlns="urn:mpeg:dash:schema:mpd:2011"><Period><AdaptationSet>'
        f'<Representation id="a" bandwidth="1"><BaseURL>{SECRET}</BaseURL></Representation></AdaptationSet>'
        f"</Period></MPD>".encode(),
        "png": _image("png"),
        "gif": _image("gif"),
        "bmp": _image("bmp"),
        "jpeg": _image("mjpeg"),
    }


def broken_uploads() -> dict[str, bytes]:
    """About three hundred malformed files, the same on every run."""
    rng = random.Random(SEED)
    corpus: dict[str, bytes] = {}
    valid = _valid_files()
    for name, data in valid.items():
        end = _header_end(name, data)
        for cut in sorted({0, 1, 4, 8, 12, *(rng.randrange(1, end) for _ in range(4))} & set(range(end))):
            corpus[f"{name}-cut-{cut}"] = data[:cut]
    corpus.update(_empty_streams())
    for rate in (0, 1, 2, 100, 3_999, 400_000, 2**31 - 1, 2**32 - 1):
        corpus[f"wav-rate-{rate}"] = _wav_header(rate=rate, channels=1) + bytes(4800)
    for channels in (0, 17, 64, 255, 65_535):
        corpus[f"wav-channels-{channels}"] = _wav_header(rate=24_000, channels=channels) + bytes(9600)
    corpus["video-only-mkv"] = _video_only("matroska", "mpeg4")
    corpus["video-only-mp4"] = _video_only("mp4", "mpeg4")
    corpus["video-only-webm"] = _video_only("webm", "libvpx")
    corpus.update(_huge_headers())
    magics = {name: data[: min(len(data), 64)] for name, data in valid.items()}
    for index in range(200):
        size = rng.choice((1, 2, 3, 16, 100, 1_000, 10_000, 60_000))
        noise = rng.randbytes(size)
        if index % 2:
            prefix_name = rng.choice(sorted(magics))
            corpus[f"noise-after-{prefix_name}-{index}"] = magics[prefix_name][: rng.randrange(4, 64)] + noise
        else:
            corpus[f"noise-{index}"] = noise
    corpus["nan-wav"] = _nan_wav()
    corpus["too-long-flac"] = _encode(np.zeros(8_000 * 31, dtype=np.float32), 8_000, "flac", "flac")
    corpus["silence-header-claims-hours"] = _wav_header(rate=24_000, channels=1, data_size=2**31) + bytes(1000)
    return corpus


def bad_speech_bodies(good: dict) -> Iterator[tuple[str, bytes]]:
    """JSON bodies for /v1/audio/speech that are not JSON, or break the schema in one field."""
    rng = random.Random(SEED)
    wrong = {
        "model": [None, "", 5, [], {}],
        "input": [None, "", "   ", "x" * 4097, 5, ["a"], {"a": 1}],
        "voice": [None, "", "nobody", 5, [], {"id": ""}, {"id": "x" * 65}, {"name": "alloy"}, "../etc/passwd"],
        "response_format": ["", "ogg", "MP3", 5, None, []],
        "speed": [0, 0.24, 4.01, -1, "fast", [], 1e400, None],
        "stream_format": ["", "chunks", 1, None],
        "seed": [-1, 2**63, 1.5, "abc", [], 10**400],
        "temperature": [0, 1e-40, 5.5, -1, "hot", None, float("nan")],
        "topk": [0, -1, 2049, 1.5, "many", None],
        "max_audio_seconds": [0, -1, 90.01, "long", None, float("inf")],
        "context": ["x", 5, [{}], [{"audio": "", "text": "a"}], [{"audio": "!!!", "text": "a"}],
                    [{"audio": "AAAA", "text": ""}], [{"audio": "AAAA", "text": "a", "speaker": -1}]] + [
            [{"audio": "AAAA", "text": "a"}] * 9],
        "stream": ["maybe", 2, [], None],
        "unknown_field": [1, "x"],
    }  # fmt: skip
    for field, values in wrong.items():
        for value in values:
            body = {**good, field: value}
            if value is None and field in ("model", "input", "voice"):
                del body[field]  # a required field missing (elsewhere null stands as the wrong value)
            yield f"{field}={value!r}"[:80], json.dumps(body).encode()
    yield "not-json", b"{not json"
    yield "empty", b""
    yield "array", b"[]"
    yield "string", b'"hello"'
    yield "nan-literal", json.dumps({**good, "speed": float("nan")}).encode()
    yield "deep-nesting", b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    yield "lone-surrogate", b'{"model": "m", "input": "\\ud800", "voice": 5}'
    yield "null-bytes", b'{"model": "m\x00", "input": "\x00"}'
    yield "duplicate-keys", b'{"model": "m", "model": 5, "input": "hi", "voice": "alloy"}'
    for index in range(40):
        yield f"noise-{index}", rng.randbytes(rng.choice((1, 10, 100, 5_000)))


def _encode(samples: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as output:
        stream = output.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None].astype(np.float32), format="flt", layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            output.mux(packet)
    return buffer.getvalue()


def _valid_files() -> dict[str, bytes]:
    t = np.arange(12_000) / 24_000
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return {
        "wav": _encode(tone, 24_000, "wav", "pcm_s16le"),
        "flac": _encode(tone, 24_000, "flac", "flac"),
        "ogg": _encode(np.repeat(tone, 2), 48_000, "ogg", "libopus"),
        "mp3": _encode(tone, 24_000, "mp3", "libmp3lame"),
        "webm": _encode(np.repeat(tone, 2), 48_000, "webm", "libopus"),
        "m4a": _encode(tone, 24_000, "ipod", "aac"),
        "aac": _encode(tone, 24_000, "adts", "aac"),
    }


def _header_end(name: str, data: bytes) -> int:
    """A byte offset before which no complete audio packet can lie."""
    if name == "ogg":
        return data.index(b"OggS", 4)  # the first page holds only the stream header
    return {"wav": 44, "flac": 42, "mp3": 40, "webm": 40, "m4a": 32, "aac": 7}[name]


def _wav_header(rate: int, channels: int, data_size: int = 0xFFFFFFFF) -> bytes:
    block = max(1, channels) * 2
    fmt = struct.pack("<HHIIHH", 1, channels, rate, (rate * block) & 0xFFFFFFFF, block & 0xFFFF, 16)
    return b"RIFF\xff\xff\xff\xffWAVEfmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", data_size)


def _empty_streams() -> dict[str, bytes]:
    """Containers with an audio stream and not one sample."""
    files = {"wav-no-samples": _wav_header(24_000, 1, data_size=0)}
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(0, dtype=np.float32), 24_000, format="FLAC")
    files["flac-no-samples"] = buffer.getvalue()
    for container, codec, rate in (("matroska", "flac", 24_000), ("ogg", "libopus", 48_000), ("mp4", "aac", 24_000)):
        buffer = io.BytesIO()
        with av.open(buffer, "w", format=container) as output:
            output.add_stream(codec, rate=rate, layout="mono")
        files[f"{container}-no-samples"] = buffer.getvalue()
    return files


def _huge_headers() -> dict[str, bytes]:
    return {
        "wav-fmt-claims-4-gib": b"RIFF\xff\xff\xff\xffWAVEfmt \xf0\xff\xff\xff" + bytes(64),
        "wav-list-claims-2-gib": b"RIFF\xff\xff\xff\xffWAVELIST\x00\x00\x00\x80" + bytes(1000),
        "id3-claims-256-mib": b"ID3\x04\x00\x00\x7f\x7f\x7f\x7f" + bytes(1000),
        "mp4-box-claims-16-eib": b"\x00\x00\x00\x01ftyp" + b"\xff" * 8 + b"M4A " + bytes(1000),
        "ebml-claims-exabytes": b"\x1a\x45\xdf\xa3\x01\xff\xff\xff\xff\xff\xff\xff" + bytes(1000),
        "ogg-page-of-255-segments": b"OggS\x00\x02" + bytes(20) + b"\xff" + b"\xff" * 255 + bytes(3000),
        "wav-junk-chunk-9-mib": b"RIFF\xff\xff\xff\xffWAVEjunk" + struct.pack("<I", 9 * 2**20) + bytes(9 * 2**20),
    }


def _video_only(container: str, codec: str) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as output:
        stream = output.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for index in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), index * 40, dtype=np.uint8), format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return buffer.getvalue()


def _image(codec: str) -> bytes:
    encoder = av.CodecContext.create(codec, "w")
    encoder.width, encoder.height = 16, 16
    encoder.pix_fmt = {"png": "rgb24", "gif": "rgb8", "bmp": "bgr24", "mjpeg": "yuvj420p"}[codec]
    encoder.time_base = fractions.Fraction(1, 1)
    frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), dtype=np.uint8), format="rgb24").reformat(
        format=encoder.pix_fmt
    )
    return b"".join(bytes(packet) for packet in [*encoder.encode(frame), *encoder.encode(None)])


def _nan_wav() -> bytes:
    samples = np.zeros(4800, dtype=np.float32)
    samples[10] = np.nan
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, 24_000, format="WAV", subtype="FLOAT")
    return buffer.getvalue()
