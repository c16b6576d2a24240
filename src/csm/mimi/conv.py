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

    def leading(self, rows: int) -> ConvState:
        """The state of batch rows 0 .. rows-1 alone (see `store_leading`)."""
        return ConvState(None if self.tail is None else self.tail[:rows])

    def store_leading(self, part: ConvState) -> None:
        """Take back a `leading` state after a step of those rows (a pointwise convolution's stays empty)."""
        if part.tail is not None:
            self.tail[: part.tail.shape[0]] = part.tail


# Output steps up to which a convolution is one matrix product over its input's windows
# (measured on streamed frames, whose layers have 2, 16, 96, 480 and 1920 steps).
_WINDOWED_STEPS = 512


class CausalConv1d(nn.Conv1d):
    """`nn.Conv1d` with causal padding; `pad_mode` is "constant" (zeros) or "replicate"."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        *,
        groups: int = 1,
        bias: bool = True,
        pad_mode: str = "constant",
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias)
        self.pad_mode = pad_mode
        self.left_padding = kernel_size - stride
        self.weight = _time_major(self.weight)
        self.register_load_state_dict_post_hook(_keep_weight_time_major)

    def forward(self, x: torch.Tensor, state: ConvState | None = None) -> torch.Tensor:
        if self.kernel_size[0] == 1:  # pointwise: no padding, nothing to carry over
            return self._convolve(x)
        if state is None:
            right_padding = -x.shape[-1] % self.stride[0]
            return self._convolve(_pad_time_major(x, self.left_padding, right_padding, self.pad_mode))
        if state.tail is None:
            state.tail = self._initial_tail(x)
        x = _cat_time_major(state.tail, x)
        frames = (x.shape[-1] - self.kernel_size[0]) // self.stride[0] + 1
        state.tail = x[..., frames * self.stride[0] :]
        return self._convolve(x)

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution of x [B, C, T] without padding, best with x stored time-major; the
        result is stored time-major.

        Up to `_WINDOWED_STEPS` output steps (a streamed frame has 2 to 480 below its last
        layers), and pointwise at any length: one matrix product of the input's windows
        [B * steps, kernel * C] with the weight as [out, kernel * C] (how it is stored).
        Time-major, a window is a run of whole rows, so gathering them is a plain copy, and a
        pointwise convolution's windows are the input itself. PyTorch's own choice for these
        shapes (its im2col fallback, or oneDNN reordering the weight at every call) takes ~2 ms
        more per streamed frame. Grouped convolutions (the depthwise upsampling) keep PyTorch's
        own choice below 64 steps. Longer signals: oneDNN runs Mimi's convolutions up to twice as
        fast time-major (channels-last); `conv1d` would not keep that layout, so this goes
        through `conv2d`.
        """
        kernel, stride = self.kernel_size[0], self.stride[0]
        steps = (x.shape[-1] - kernel) // stride + 1
        if self.groups == 1 and (steps <= _WINDOWED_STEPS or kernel == 1):
            batch, channels, _ = x.shape
            windows = x.unfold(-1, kernel, stride).permute(0, 2, 3, 1).reshape(batch * steps, kernel * channels)
            weight = self.weight.permute(0, 2, 1).reshape(self.out_channels, -1)
            y = F.linear(windows, weight, self.bias)
            return y.view(batch, steps, -1).transpose(1, 2)
        if steps < 64:
            return super().forward(x)
        x = x.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        y = F.conv2d(x, self.weight.unsqueeze(2), self.bias, (1, stride), 0, 1, self.groups)
        return y.squeeze(2)

    def _initial_tail(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_mode == "replicate":
            return x[..., :1].expand(-1, -1, self.left_padding)
        return x.new_zeros(x.shape[0], x.shape[1], self.left_padding)


def _time_major(weight: torch.Tensor) -> nn.Parameter:
    """A convolution weight [out, in, kernel] stored as [out, kernel, in]: the layout of its
    windowed product and of oneDNN's channels-last convolution."""
    stored = weight.detach().transpose(1, 2).contiguous().transpose(1, 2)
    return nn.Parameter(stored, requires_grad=weight.requires_grad)


def _keep_weight_time_major(module: CausalConv1d, incompatible_keys) -> None:
    """After loading (which may assign the loaded tensor itself), store the weight time-major again."""
    if not module.weight.transpose(1, 2).is_contiguous():
        module.weight = _time_major(module.weight)


def _cat_time_major(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """first [B, C, T1] and second [B, C, T2] joined in time, stored time-major (`torch.cat`
    would store it channels-first: a transposing copy of time-major inputs)."""
    batch, channels, length = first.shape
    joined = first.new_empty(batch, length + second.shape[-1], channels)
    joined[:, :length] = first.transpose(1, 2)
    joined[:, length:] = second.transpose(1, 2)
    return joined.transpose(1, 2)


def _pad_time_major(x: torch.Tensor, left: int, right: int, mode: str) -> torch.Tensor:
    """x [B, C, T] padded in time ("constant": zeros, "replicate": the edge samples), stored
    time-major, in one copy."""
    batch, channels, steps = x.shape
    padded = x.new_empty(batch, left + steps + right, channels)
    padded[:, left : left + steps] = x.transpose(1, 2)
    if mode == "replicate":
        padded[:, :left] = x[:, :, :1].transpose(1, 2)
        padded[:, left + steps :] = x[:, :, -1:].transpose(1, 2)
    else:
        padded[:, :left] = 0
        padded[:, left + steps :] = 0
    return padded.transpose(1, 2)


class CausalConvTranspose1d(CausalConv1d):
    """A transposed convolution that gives `stride` samples per input step, computed as the
    causal convolution it equals: with `taps = kernel // stride`, the `stride` samples of step t
    depend on input steps t - taps + 1..t only, so a convolution of `taps` steps into
    `out_channels * stride` channels, whose channels are then interleaved in time, gives them.
    Those channels are ordered (group, sample i of the step, channel of the group): with one
    group, the convolution's time-major output is then already the signal, without a copy.

    The whole-signal call drops the last `kernel - stride` samples of the transposed
    convolution (they wait for steps that never come); the streaming state is the last
    `taps - 1` input steps. Weights are kept in that convolution's layout, and read and
    written (state dicts) in `nn.ConvTranspose1d`'s, [in, out / groups, kernel] and bias [out].
    PyTorch's CPU kernel for transposed convolutions is several times slower.
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
        super().__init__(in_channels, out_channels * stride, kernel_size // stride, groups=groups, bias=bias)
        self.upsampling = stride
        self.register_state_dict_post_hook(_write_transposed_layout)
        self.register_load_state_dict_pre_hook(_read_transposed_layout)

    def forward(self, x: torch.Tensor, state: ConvState | None = None) -> torch.Tensor:
        y = super().forward(x, state).transpose(1, 2)  # [B, T, out * stride], time-major
        batch, steps, channels = y.shape
        groups, stride = self.groups, self.upsampling
        # Sample t * stride + i of channel c of group g is y[:, t, (g, i, c)]; the result stays time-major.
        samples = y.reshape(batch, steps, groups, stride, channels // stride // groups).transpose(2, 3)
        return samples.reshape(batch, steps * stride, channels // stride).transpose(1, 2)

    def to_transposed_layout(self, weight: torch.Tensor) -> torch.Tensor:
        """[out * stride, in / groups, taps] -> nn.ConvTranspose1d's [in, out / groups, kernel]."""
        groups, stride, (channels, in_per_group, taps) = self.groups, self.upsampling, weight.shape
        out_per_group = channels // stride // groups
        # Conv tap k reads input step t - (taps - 1 - k): transposed kernel index (taps - 1 - k) * stride + i.
        grouped = weight.reshape(groups, stride, out_per_group, in_per_group, taps).flip(-1)
        return grouped.permute(0, 3, 2, 4, 1).reshape(groups * in_per_group, out_per_group, taps * stride)

    def from_transposed_layout(self, weight: torch.Tensor) -> torch.Tensor:
        """nn.ConvTranspose1d's [in, out / groups, kernel] -> [out * stride, in / groups, taps]."""
        groups, stride, (in_channels, out_per_group, kernel) = self.groups, self.upsampling, weight.shape
        grouped = weight.reshape(groups, in_channels // groups, out_per_group, kernel // stride, stride)
        return grouped.permute(0, 4, 2, 1, 3).flip(-1).reshape(-1, in_channels // groups, kernel // stride)

    def to_transposed_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """[out * stride] (each channel's bias repeated for its samples) -> [out]."""
        return bias.view(self.groups, self.upsampling, -1)[:, 0].reshape(-1)

    def from_transposed_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """[out] -> [out * stride], in the convolution's channel order."""
        grouped = bias.view(self.groups, 1, -1)
        return grouped.expand(-1, self.upsampling, -1).reshape(-1)


def _write_transposed_layout(module: CausalConvTranspose1d, state: dict, prefix: str, metadata: dict) -> None:
    state[prefix + "weight"] = module.to_transposed_layout(state[prefix + "weight"])
    if module.bias is not None:
        state[prefix + "bias"] = module.to_transposed_bias(state[prefix + "bias"])


def _read_transposed_layout(module: CausalConvTranspose1d, state: dict, prefix: str, *_) -> None:
    if prefix + "weight" in state:
        state[prefix + "weight"] = module.from_transposed_layout(state[prefix + "weight"]).contiguous()
    if module.bias is not None and prefix + "bias" in state:
        state[prefix + "bias"] = module.from_transposed_bias(state[prefix + "bias"])
