"""Mimi hyper-parameters: the published codec is the default instance."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class MimiConfig:
    """Shapes of a Mimi codec; `MimiConfig()` is the published 24 kHz, 12.5 Hz model."""

    sample_rate: int = 24000
    num_filters: int = 64  # SEANet width at the waveform end; doubles at every stage
    ratios: tuple[int, ...] = (8, 6, 5, 4)  # decoder upsampling strides; the encoder uses them reversed
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    dim: int = 512  # latent width: SEANet output, transformers, quantizer input
    num_layers: int = 8
    num_heads: int = 8
    ffn_dim: int = 2048
    window: int = 250  # causal attention span, in 25 Hz steps
    rope_base: float = 10000.0
    frame_stride: int = 2  # latent steps per codec frame (25 Hz -> 12.5 Hz)
    codebook_size: int = 2048
    codebook_dim: int = 256
    num_codebooks: int = 32  # 1 semantic + 31 acoustic

    @property
    def hop_length(self) -> int:
        """Waveform samples per latent (25 Hz) step."""
        return math.prod(self.ratios)

    @property
    def frame_size(self) -> int:
        """Waveform samples per codec frame."""
        return self.hop_length * self.frame_stride

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.frame_size
