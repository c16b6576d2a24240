"""SEANet encoder (waveform -> 25 Hz latents) and decoder (latents -> waveform).

Layer indices follow the published checkpoints (activations take an index too), so weights
map onto `layers.<i>` one to one.
"""

from __future__ import annotations

import torch
from torch import nn

from csm.mimi.config import MimiConfig
from csm.mimi.conv import CausalConv1d, CausalConvTranspose1d, ConvState

SEANetState = list  # one state per layer: a ConvState, a ResidualBlock's pair, or None


class ResidualBlock(nn.Module):
    """x + conv1x1(elu(conv3(elu(x)))), the inner width halved."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        hidden = channels // 2
        # In place where the input is a fresh intermediate: large new buffers cost page faults.
        self.block = nn.ModuleList(
            [
                nn.ELU(),  # not in place: x is still needed
                CausalConv1d(channels, hidden, kernel_size),
                nn.ELU(inplace=True),
                CausalConv1d(hidden, channels, 1),
            ]
        )

    def forward(self, x: torch.Tensor, state: list[ConvState] | None = None) -> torch.Tensor:
        elu1, conv1, elu2, conv2 = self.block
        h = conv1(elu1(x), None if state is None else state[0])
        return conv2(elu2(h), None if state is None else state[1]).add_(x)

    def new_state(self) -> list[ConvState]:
        return [ConvState(), ConvState()]


class _Stack(nn.Module):
    """Layers applied in order; each one that streams gets its own slot of the state.

    Its ELUs work in place: each follows a layer of the stack, whose output nothing else holds.
    """

    layers: nn.ModuleList

    def forward(self, x: torch.Tensor, state: SEANetState | None = None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            if isinstance(layer, nn.ELU):
                x = layer(x)
            else:
                x = layer(x, None if state is None else state[i])
        return x

    def reset_rows(self, state: SEANetState, rows: torch.Tensor) -> None:
        """Start the given batch rows (an index tensor) of `state` afresh; the others go on."""
        for conv_state in self.conv_states(state):
            conv_state.reset(rows)

    def conv_states(self, state: SEANetState) -> list[ConvState]:
        """Every convolution's state in `state`, in layer order."""
        return [
            conv_state
            for layer_state in state
            for conv_state in (layer_state if isinstance(layer_state, list) else [layer_state])
            if conv_state is not None
        ]

    def leading(self, state: SEANetState, rows: int) -> SEANetState:
        """The state of batch rows 0 .. rows-1 alone (see `ConvState.leading`)."""
        return [
            [conv.leading(rows) for conv in layer_state]
            if isinstance(layer_state, list)
            else None
            if layer_state is None
            else layer_state.leading(rows)
            for layer_state in state
        ]

    def new_state(self) -> SEANetState:
        """A fresh streaming state: silence (zeros) before the first chunk."""
        states: SEANetState = []
        for layer in self.layers:
            if isinstance(layer, ResidualBlock):
                states.append(layer.new_state())
            elif isinstance(layer, nn.ELU):
                states.append(None)
            else:
                states.append(ConvState())
        return states


class SEANetEncoder(_Stack):
    def __init__(self, config: MimiConfig):
        super().__init__()
        channels = config.num_filters
        layers: list[nn.Module] = [CausalConv1d(1, channels, config.kernel_size)]
        for stride in reversed(config.ratios):
            layers += [
                ResidualBlock(channels, config.residual_kernel_size),
                nn.ELU(inplace=True),
                CausalConv1d(channels, channels * 2, 2 * stride, stride),
            ]
            channels *= 2
        layers += [nn.ELU(inplace=True), CausalConv1d(channels, config.dim, config.last_kernel_size)]
        self.layers = nn.ModuleList(layers)


class SEANetDecoder(_Stack):
    def __init__(self, config: MimiConfig):
        super().__init__()
        channels = config.num_filters * 2 ** len(config.ratios)
        layers: list[nn.Module] = [CausalConv1d(config.dim, channels, config.kernel_size)]
        for stride in config.ratios:
            layers += [
                nn.ELU(inplace=True),
                CausalConvTranspose1d(channels, channels // 2, 2 * stride, stride),
                ResidualBlock(channels // 2, config.residual_kernel_size),
            ]
            channels //= 2
        layers += [nn.ELU(inplace=True), CausalConv1d(channels, 1, config.last_kernel_size)]
        self.layers = nn.ModuleList(layers)
