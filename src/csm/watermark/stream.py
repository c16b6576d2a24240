"""Watermarking audio that is sent while it is made: every clip of about a second marked on its own.

SilentCipher marks a whole clip at once (an STFT over all of it) and needs about 0.9 s to
read a mark back, so 80 ms frames cannot be marked one by one. A stream is therefore cut
into clips of `CLIP_SAMPLES` (13 frames, 1.04 s) at fixed positions; each clip is marked
exactly as `Watermarker.encode` marks a clip of its own and sent as soon as it is complete.
The first audio leaves after one clip instead of one frame. The last clip is whatever is
left (shorter than `CLIP_SAMPLES`): it is marked too, but a rest under ~0.9 s cannot be
read back. Marks sit in each clip, not across clips: check a streamed recording clip by
clip (`clip_bounds`), not as one file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

FRAME_SAMPLES = 1920
CLIP_FRAMES = 13
CLIP_SAMPLES = CLIP_FRAMES * FRAME_SAMPLES


class ClipMarker:
    """Collects streamed 1-D chunks and returns them as marked clips of `clip_samples`.

    `mark` marks one clip (e.g. `Generator.watermark`). `push` returns the clips completed
    by a chunk (often none); `finish` returns the marked rest.
    """

    def __init__(self, mark: Callable[[torch.Tensor], torch.Tensor], clip_samples: int = CLIP_SAMPLES):
        if clip_samples < 1:
            raise ValueError(f"clip_samples must be positive, got {clip_samples}")
        self._mark = mark
        self._clip_samples = clip_samples
        self._pending: list[torch.Tensor] = []
        self._pending_samples = 0

    def push(self, chunk: torch.Tensor) -> list[torch.Tensor]:
        self._pending.append(chunk)
        self._pending_samples += chunk.numel()
        clips = []
        while self._pending_samples >= self._clip_samples:
            audio = torch.cat(self._pending)
            clips.append(self._mark(audio[: self._clip_samples]))
            rest = audio[self._clip_samples :]
            self._pending, self._pending_samples = [rest], rest.numel()
        return clips

    def finish(self) -> list[torch.Tensor]:
        if self._pending_samples == 0:
            return []
        rest = torch.cat(self._pending)
        self._pending, self._pending_samples = [], 0
        return [self._mark(rest)]


def watermark_stream(
    chunks: Iterable[torch.Tensor], mark: Callable[[torch.Tensor], torch.Tensor], clip_samples: int = CLIP_SAMPLES
) -> Iterator[torch.Tensor]:
    """`chunks` joined and re-cut into marked clips of `clip_samples` (the last one shorter)."""
    marker = ClipMarker(mark, clip_samples)
    for chunk in chunks:
        yield from marker.push(chunk)
    yield from marker.finish()


def clip_bounds(length: int, clip_samples: int = CLIP_SAMPLES) -> list[tuple[int, int]]:
    """(start, end) of each separately marked clip in a streamed recording of `length` samples."""
    return [(start, min(start + clip_samples, length)) for start in range(0, length, clip_samples)]
