"""Causal 1-d convolutions that run either on a whole signal or chunk by chunk.

A convolution called without a state pads the whole signal the way Mimi was trained and
run by CSM (moshi 0.2.2, transformers `MimiModel`): on the left by `kernel - stride`, and on
the right by just enough for the last window to be full. Called with a state, it consumes a
chunk whose length is a multiple of the stride and keeps the input tail that the next chunk
needs; the chunks then give exactly the samples of the whole-signal call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ConvState:
    """Input samples not yet consumed by a full window; None before the first chunk."""

    tail: torch.Tensor | None = None

    def reset(self, rows: torch.Tensor) -> None:
        """Start the given batch rows (an index tensor) afresh with silence (zeros): the fresh
        state of a zero-padded convolution and of a transposed one."""
        if self.tail is not None:
            self.tail[rows] = 0


class CausalConv1d(nn.Conv1d):
    """`nn.Conv1d` with causal padding; `pad_mode` is "constant" (zeros) or "replicate"."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        *,
        bias: bool = True,
        pad_mode: str = "constant",
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, bias=bias)
        self.pad_mode = pad_mode
        self.left_padding = kernel_size - stride

    def forward(self, x: torch.Tensor, state: ConvState | None = None) -> torch.Tensor:
        if state is None:
            right_padding = -x.shape[-1] % self.stride[0]
            return super().forward(F.pad(x, (self.left_padding, right_padding), mode=self.pad_mode))
        if state.tail is None:
            state.tail = self._initial_tail(x)
        x = torch.cat([state.tail, x], dim=-1)
        frames = (x.shape[-1] - self.kernel_size[0]) // self.stride[0] + 1
        state.tail = x[..., frames * self.stride[0] :]
        return super().forward(x)

    def _initial_tail(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_mode == "replicate":
            return x[..., :1].expand(-1, -1, self.left_padding)
        return x.new_zeros(x.shape[0], x.shape[1], self.left_padding)


class CausalConvTranspose1d(nn.ConvTranspose1d):
    """`nn.ConvTranspose1d` that gives `stride` samples per input step.

    The last `kernel - stride` output samples of a chunk are incomplete: the whole-signal call
    drops them, the chunked call keeps them in its state and adds them to the next chunk.
    Computed as one matmul and an overlap-add: PyTorch's CPU kernel for transposed
    convolutions is ~20x slower on the few steps of a streamed frame.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        *,
        groups: int = 1,
        bias: bool = True,
    ):
        if kernel_size % stride:
            raise ValueError(f"kernel_size {kernel_size} must be a multiple of stride {stride}")
        super().__init__(in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor, state: ConvState | None = None) -> torch.Tensor:
        length = x.shape[-1] * self.stride[0]
        y = self._overlap_add(x)
        if state is not None:
            if state.tail is not None:
                y[..., : state.tail.shape[-1]] += state.tail
            state.tail = y[..., length:]
        y = y[..., :length]
        return y if self.bias is None else y + self.bias[:, None]

    def _overlap_add(self, x: torch.Tensor) -> torch.Tensor:
        """The transposed convolution without bias, all (T - 1) * stride + kernel samples."""
        batch, _, steps = x.shape
        stride, groups = self.stride[0], self.groups
        in_per_group, out_per_group, kernel = self.weight.shape
        weight = self.weight.view(groups, in_per_group // groups, out_per_group, kernel)
        # contributions[b, c, t, j, i]: of step t to output sample (t + j) * stride + i
        contributions = torch.einsum("bgit,giok->bgotk", x.view(batch, groups, -1, steps), weight)
        contributions = contributions.reshape(batch, groups * out_per_group, steps, kernel // stride, stride)
        out = x.new_zeros(batch, groups * out_per_group, steps + kernel // stride - 1, stride)
        for j in range(kernel // stride):
            out[:, :, j : j + steps] += contributions[:, :, :, j]
        return out.flatten(2)
