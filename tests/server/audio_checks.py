"""Reading response bodies back: PyAV for the containers, numpy for raw PCM."""

from __future__ import annotations

import io

import av
import numpy as np

FRAME = 1920


def decode(data: bytes, response_format: str) -> tuple[int, int, np.ndarray]:
    """(sample rate, channels, float samples of channel 0) of a response body."""
    if response_format == "pcm":
        return 24_000, 1, np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        frames = [frame for frame in container.decode(stream)]
    rate = frames[0].sample_rate
    channels = len(frames[0].layout.channels)
    samples = np.concatenate([frame.to_ndarray().reshape(channels, -1)[0] for frame in frames])
    if samples.dtype == np.int16:
        return rate, channels, samples.astype(np.float32) / 32768
    return rate, channels, samples.astype(np.float32)


def opus_head(data: bytes) -> tuple[int, int]:
    """(channels, input sample rate) from the OpusHead packet of an Ogg Opus stream."""
    head = data.index(b"OpusHead")
    return data[head + 9], int.from_bytes(data[head + 12 : head + 16], "little")
