"""The three networks of SilentCipher's 44.1 kHz model, on magnitude spectrograms.

All three work on (batch, channels, frequency rows, frames) images of the STFT magnitude
(`spectrum.py`). The message occupies the lowest `BAND_ROWS` frequency rows; it is a
string of symbols from a 5-letter alphabet (`message.py`), one symbol per frame.
"""

from __future__ import annotations

import torch
from torch import nn

BAND_ROWS = 1024  # frequency rows 0..1023 (up to ~11 kHz) carry the message
SYMBOL_KINDS = 5  # the end marker 0 and the four 2-bit values 1..4
ENCODER_CHANNELS = 32
CARRIER_CHANNELS = 96
MESSAGE_CHANNELS = 128


class GatedLayer(nn.Module):
    """`norm(conv(x) * sigmoid(gate(x)))`, normalised with the statistics of `x` itself.

    The original keeps its BatchNorm in training mode, so every call normalises with the
    statistics of the current input and the stored running averages are never used.
    Per-sample statistics give the same numbers for one clip and let us batch several.
    """

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, kernel_size, padding=kernel_size // 2)
        self.gate = nn.Conv2d(dim_in, dim_out, kernel_size, padding=kernel_size // 2)
        self.norm = nn.InstanceNorm2d(dim_out, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place, and the gate freed before normalising: at most three activations of
        # this layer's size are alive at once, the bulk of the memory used.
        return self.norm(self.conv(x).mul_(self.gate(x).sigmoid_()))


class CarrierEncoder(nn.Module):
    """Features of the carrier magnitude, and the message spread over the message band."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            GatedLayer(1, ENCODER_CHANNELS),
            GatedLayer(ENCODER_CHANNELS, ENCODER_CHANNELS),
            GatedLayer(ENCODER_CHANNELS, ENCODER_CHANNELS),
        )
        self.message = nn.Linear(SYMBOL_KINDS, BAND_ROWS)

    def forward(self, magnitude: torch.Tensor) -> torch.Tensor:
        """(B, 1, F, T) -> (B, 32, F, T)."""
        return self.layers(magnitude)

    def spread_message(self, one_hot: torch.Tensor, rows: int) -> torch.Tensor:
        """One-hot symbols (5, T) -> (1, 1, rows, T): the band image, zero above the band."""
        band = self.message(one_hot.T).T
        return nn.functional.pad(band, (0, 0, 0, rows - BAND_ROWS))[None, None]


class CarrierDecoder(nn.Module):
    """The watermark to subtract from the magnitude, as a fraction of each frame's level.

    The original feeds it the encoder features, then the magnitude and the message image
    each repeated 32 times. The loader folds those repeats into the first layer's weights
    (a convolution of 32 equal channels is one convolution with the summed kernel), so
    the input here is 32 + 1 + 1 channels: same result, a third of the work and memory.
    """

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            GatedLayer(ENCODER_CHANNELS + 2, CARRIER_CHANNELS),
            GatedLayer(CARRIER_CHANNELS, CARRIER_CHANNELS),
            GatedLayer(CARRIER_CHANNELS, CARRIER_CHANNELS),
            GatedLayer(CARRIER_CHANNELS, 1, kernel_size=1),
        )

    def forward(self, features: torch.Tensor, message_sdr: float) -> torch.Tensor:
        """(B, 34, F, T) -> (B, 1, F, T), non-negative, zero above the band, each frame's RMS
        `10^(-message_sdr/20)`."""
        watermark = self.layers(features).abs_()
        watermark[:, :, BAND_ROWS:] = 0
        frame_rms = watermark.pow(2).mean(dim=2, keepdim=True) ** 0.5
        return watermark / frame_rms / (10 ** (message_sdr / 20))


class MessageDecoder(nn.Module):
    """Per-frame symbol logits read from the message band of a magnitude spectrogram."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            GatedLayer(1, MESSAGE_CHANNELS),
            *(GatedLayer(MESSAGE_CHANNELS, MESSAGE_CHANNELS) for _ in range(8)),
            GatedLayer(MESSAGE_CHANNELS, SYMBOL_KINDS),
        )
        self.readout = nn.Linear(BAND_ROWS, 1)

    def forward(self, magnitude: torch.Tensor) -> torch.Tensor:
        """(B, 1, F, T) -> logits (B, 5, T)."""
        features = self.layers(magnitude[:, :, :BAND_ROWS])
        return self.readout(features.transpose(2, 3)).squeeze(3)
