"""Speed without a change of pitch: FFmpeg's `atempo` filter (WSOLA), fed chunk by chunk."""

from __future__ import annotations

import av
import av.filter
import numpy as np
import torch

# One atempo instance handles factors 0.5 to 2.0 well; other speeds chain several.
_LOWEST, _HIGHEST = 0.5, 2.0
# atempo keeps its last partial window: this much silence at the end pushes all audio out.
_FLUSH_SECONDS = 0.25


def tempo_factors(speed: float) -> list[float]:
    """Factors within atempo's best range whose product is `speed`."""
    factors = []
    while speed < _LOWEST:
        factors.append(_LOWEST)
        speed /= _LOWEST
    while speed > _HIGHEST:
        factors.append(_HIGHEST)
        speed /= _HIGHEST
    return [*factors, speed]


class TimeStretch:
    """Mono float audio played `speed` times faster (0.25-4.0) at the same pitch.

    `push` returns the stretched audio that is ready (possibly empty); `finish` the rest.
    In all, N samples in give round(N / speed) out.
    """

    def __init__(self, speed: float, sample_rate: int):
        self._speed = speed
        self._rate = sample_rate
        self._samples = 0
        self._emitted = 0
        self._graph = av.filter.Graph()
        node = self._graph.add_abuffer(
            format="flt", sample_rate=sample_rate, layout="mono", time_base=f"1/{sample_rate}"
        )
        for factor in tempo_factors(speed):
            following = self._graph.add("atempo", f"{factor!r}")
            node.link_to(following)
            node = following
        node.link_to(self._graph.add("abuffersink"))
        self._graph.configure()

    def push(self, audio: torch.Tensor) -> torch.Tensor:
        return self._take(self._push(audio))

    def finish(self) -> torch.Tensor:
        expected = round(self._samples / self._speed)
        rest = self._push(torch.zeros(int(_FLUSH_SECONDS * self._rate)))
        self._graph.push(None)
        rest = torch.cat([rest, self._pull()])
        return self._take(rest[: max(0, expected - self._emitted)])

    def _take(self, audio: torch.Tensor) -> torch.Tensor:
        self._emitted += audio.numel()
        return audio

    def _push(self, audio: torch.Tensor) -> torch.Tensor:
        samples = np.ascontiguousarray(audio.detach().to("cpu", torch.float32).numpy()[None])
        frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
        frame.sample_rate = self._rate
        frame.pts = self._samples
        self._samples += samples.shape[-1]
        self._graph.push(frame)
        return self._pull()

    def _pull(self) -> torch.Tensor:
        pieces = []
        while True:
            try:
                frame = self._graph.pull()
            except (av.BlockingIOError, av.EOFError):
                break
            pieces.append(torch.from_numpy(frame.to_ndarray().reshape(-1).astype(np.float32)))
        return torch.cat(pieces) if pieces else torch.zeros(0)

