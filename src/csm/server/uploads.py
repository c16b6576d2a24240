"""Audio sent by clients: read with a size cap while it streams in, then decoded and checked.

Only audio containers are opened: FFmpeg probes the bytes, and its `format_whitelist`
refuses any demuxer outside `AUDIO_DEMUXERS` before that demuxer reads a byte. Playlists
(HLS, ffconcat), image sequences and network demuxers open other files or URLs named in
their input: such an upload could make the server read its own files. As a second wall,
`protocol_whitelist` names no protocol, so nothing can be opened besides the in-memory
buffer. Decoding stops as soon as the audio is longer than allowed, and frames are checked
before they are resampled, so a small file that claims hours, a 1 Hz sample rate or
hundreds of channels costs no more than the cap.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import av
import numpy as np
import torch
from starlette.requests import ClientDisconnect, Request

from csm.audio import check_audio
from csm.server.errors import APIError

SAMPLE_RATE = 24_000
# FFmpeg's audio container demuxers, by the names its format_whitelist matches.
AUDIO_DEMUXERS = (
    "wav", "w64", "flac", "ogg", "mp3", "aac", "matroska", "webm", "mov", "mp4", "m4a", "aiff", "caf", "au",
)  # fmt: skip
_OPEN_OPTIONS = {
    "format_whitelist": ",".join(AUDIO_DEMUXERS),
    # Not a protocol's name: every nested open (a file, a URL) is refused.
    "protocol_whitelist": "none",
}
# Beyond these an upload is not speech: refused before its frames are resampled.
RATE_RANGE = (4_000, 384_000)
MAX_CHANNELS = 16


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for part in body_parts(request):
        body += part
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


async def body_parts(request: Request) -> AsyncIterator[bytes]:
    """The body as it arrives; a client that leaves before the end is an APIError, not a server error."""
    try:
        async for part in request.stream():
            yield part
    except ClientDisconnect:
        raise APIError(499, "client disconnected before the end of its request") from None


def decode_audio(data: bytes, name: str, max_seconds: float) -> torch.Tensor:
    """`data` (an audio file's bytes) as 1-D float32 at 24 kHz, mono; a ValueError saying why not."""
    if not data:
        raise ValueError(f"{name} is empty")
    limit = int(max_seconds * SAMPLE_RATE)
    pieces: list[np.ndarray] = []
    decoded = 0
    try:
        with av.open(io.BytesIO(data), mode="r", options=dict(_OPEN_OPTIONS)) as container:
            if not set(container.format.name.split(",")) & set(AUDIO_DEMUXERS):
                raise ValueError(f"{name} is not an audio file ({container.format.name})")
            if not container.streams.audio:
                raise ValueError(f"{name} has no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(container.streams.audio[0]):
                decoded += _expected_samples(frame, name)
                if decoded > limit:
                    raise ValueError(f"{name} is longer than {max_seconds:g} s")
                pieces.extend(piece.to_ndarray().reshape(-1) for piece in resampler.resample(frame))
            pieces.extend(piece.to_ndarray().reshape(-1) for piece in resampler.resample(None))
    except (av.FFmpegError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{name} is not a readable audio file ({error.__class__.__name__}); "
            f"accepted containers: {', '.join(AUDIO_DEMUXERS)}"
        ) from None
    audio = torch.from_numpy(np.concatenate(pieces).astype(np.float32)) if pieces else torch.zeros(0)
    if audio.numel() > limit:
        raise ValueError(f"{name} is longer than {max_seconds:g} s")
    check_audio(audio, name)
    if not audio.abs().max() > 0:
        raise ValueError(f"{name} is silent: it holds no voice")
    return audio


def _expected_samples(frame: av.AudioFrame, name: str) -> int:
    """How many 24 kHz samples `frame` will resample to, once its rate and channels are checked."""
    rate, channels = frame.sample_rate, len(frame.layout.channels)
    if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
        raise ValueError(f"{name} has a sample rate of {rate} Hz, outside {RATE_RANGE[0]}-{RATE_RANGE[1]} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise ValueError(f"{name} has {channels} channels; at most {MAX_CHANNELS} are read")
    return -(-frame.samples * SAMPLE_RATE // rate)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body larger than {limit // 2**20} MiB", code="request_too_large")
