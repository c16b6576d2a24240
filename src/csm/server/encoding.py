"""Audio to bytes in each response format, chunk by chunk, with one encoder per response.

`mp3`, `opus` (in Ogg), `aac` (ADTS) and `flac` go through PyAV's bundled FFmpeg encoders,
so a streamed body is one continuous stream that plays without clicks. `wav` is one
header followed by 16-bit samples: streamed, its RIFF and data sizes are 0xFFFFFFFF
(unknown, as players expect); a whole response puts an exact header before its samples. `pcm` is
the bare samples: 24 kHz, signed 16-bit little-endian, mono.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod

import av
import numpy as np
import torch

from csm.audio import pcm16_bytes

MEDIA_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
# (container, codec, container options) of the formats PyAV encodes.
_CODECS = {
    "mp3": ("mp3", "libmp3lame", {}),
    # Ogg pages of 20 ms instead of the default second, so streamed bytes leave at once.
    "opus": ("ogg", "libopus", {"page_duration": "20000"}),
    "aac": ("adts", "aac", {}),
    "flac": ("flac", "flac", {}),
}
_UNKNOWN_SIZE = 0xFFFFFFFF


class Encoder(ABC):
    """Turns mono float chunks into the bytes of one response; `finish` returns the tail."""

    @abstractmethod
    def encode(self, audio: torch.Tensor) -> bytes:
        """The bytes that `audio` (the next chunk) adds to the response."""

    def finish(self) -> bytes:
        return b""


def open_encoder(response_format: str, sample_rate: int) -> Encoder:
    """An encoder for `response_format` (a wav's header says its length is unknown: see `wav_header`)."""
    if response_format == "pcm":
        return _PCM()
    if response_format == "wav":
        return _WAV(sample_rate)
    return _PyAV(response_format, sample_rate)


def wav_header(sample_rate: int, total_samples: int | None) -> bytes:
    """A 16-bit mono wav header; sizes 0xFFFFFFFF (unknown) when `total_samples` is None."""
    data = _UNKNOWN_SIZE if total_samples is None else 2 * total_samples
    riff = _UNKNOWN_SIZE if total_samples is None else 36 + data
    fmt = struct.pack("<HHIIHH", 1, 1, sample_rate, 2 * sample_rate, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", riff)
        + b"WAVEfmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", data)
    )


class _PCM(Encoder):
    def encode(self, audio: torch.Tensor) -> bytes:
        return pcm16_bytes(audio)


class _WAV(Encoder):
    def __init__(self, sample_rate: int):
        self._header = wav_header(sample_rate, None)

    def encode(self, audio: torch.Tensor) -> bytes:
        header, self._header = self._header, b""
        return header + pcm16_bytes(audio)

    def finish(self) -> bytes:
        header, self._header = self._header, b""
        return header


class _Sink:
    """Where the muxer writes: collects bytes and cannot seek, as a network stream."""

    def __init__(self):
        self._parts: list[bytes] = []

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


class _PyAV(Encoder):
    def __init__(self, response_format: str, sample_rate: int):
        container, codec, options = _CODECS[response_format]
        self._sink = _Sink()
        self._container = av.open(self._sink, mode="w", format=container, options=options)
        self._stream = self._container.add_stream(codec, rate=sample_rate, layout="mono")
        self._rate = sample_rate
        self._samples = 0

    def encode(self, audio: torch.Tensor) -> bytes:
        samples = audio.detach().to("cpu", torch.float32).clamp(-1.0, 1.0).numpy()
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[None]), format="flt", layout="mono")
        frame.sample_rate = self._rate
        frame.pts = self._samples
        self._samples += samples.shape[-1]
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        return self._sink.take()

    def finish(self) -> bytes:
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._sink.take()
