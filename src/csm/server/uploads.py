"""Audio sent by clients: read with a size cap while it streams in, then decoded and checked.

Any container FFmpeg knows is accepted (wav, flac, ogg, mp3, webm, m4a, ...). Decoding
stops as soon as the audio is longer than allowed, so a small file that expands to hours
costs no more than the cap.
"""

from __future__ import annotations

import io

import av
import numpy as np
import torch
from starlette.requests import Request

from csm.audio import check_audio
from csm.server.errors import APIError

SAMPLE_RATE = 24_000


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


def decode_audio(data: bytes, name: str, max_seconds: float) -> torch.Tensor:
    """`data` (an audio file's bytes) as 1-D float32 at 24 kHz, mono; a ValueError saying why not."""
    if not data:
        raise ValueError(f"{name} is empty")
    limit = int(max_seconds * SAMPLE_RATE)
    pieces: list[np.ndarray] = []
    decoded = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise ValueError(f"{name} has no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(container.streams.audio[0]):
                for piece in resampler.resample(frame):
                    pieces.append(piece.to_ndarray().reshape(-1))
                    decoded += piece.samples
                if decoded > limit:
                    raise ValueError(f"{name} is longer than {max_seconds:g} s")
            pieces.extend(piece.to_ndarray().reshape(-1) for piece in resampler.resample(None))
    except (av.FFmpegError, UnicodeDecodeError) as error:
        raise ValueError(f"{name} is not a readable audio file ({error.__class__.__name__})") from None
    audio = torch.from_numpy(np.concatenate(pieces).astype(np.float32)) if pieces else torch.zeros(0)
    if audio.numel() > limit:
        raise ValueError(f"{name} is longer than {max_seconds:g} s")
    return check_audio(audio, name)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body larger than {limit // 2**20} MiB", code="request_too_large")
