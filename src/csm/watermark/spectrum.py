"""The watermark's STFT at 44.1 kHz: magnitude and phase of a clip, and the way back.

A clip of L samples is zero-padded on the right to the next multiple of `N_FFT` (a whole
extra `N_FFT` when L already is one), then analysed with a periodic Hann window, hop
`HOP`, centred frames and reflect padding: `frame_count(L)` = 3 + 2 * (L // N_FFT) frames.
"""

from __future__ import annotations

import torch

N_FFT = 4096
HOP = 2048


def padded_length(length: int) -> int:
    return (length // N_FFT + 1) * N_FFT


def frame_count(length: int) -> int:
    return padded_length(length) // HOP + 1


def spectrogram(signals: torch.Tensor) -> torch.Tensor:
    """Complex STFT (B, 2049, T) of equally long clips (B, L)."""
    padded = torch.nn.functional.pad(signals, (0, padded_length(signals.shape[-1]) - signals.shape[-1]))
    return _stft(padded)


def shifted_spectrograms(signal: torch.Tensor, shifts: list[int]) -> torch.Tensor:
    """Complex STFTs (len(shifts), 2049, T) of `signal[shift:]` for shifts whose frame counts agree."""
    length = padded_length(signal.shape[-1] - shifts[0])
    if any(padded_length(signal.shape[-1] - shift) != length for shift in shifts):
        raise ValueError("shifted clips of one batch must pad to the same length")
    batch = signal.new_zeros(len(shifts), length)
    for row, shift in enumerate(shifts):
        batch[row, : signal.shape[-1] - shift] = signal[shift:]
    return _stft(batch)


def magnitude(spectrum: torch.Tensor) -> torch.Tensor:
    return (spectrum.real**2 + spectrum.imag**2).sqrt()


def phase(spectrum: torch.Tensor) -> torch.Tensor:
    return torch.atan2(spectrum.imag, spectrum.real)


def inverse(magnitude: torch.Tensor, phase: torch.Tensor, length: int) -> torch.Tensor:
    """Clips (B, length) from magnitudes and phases (B, 2049, T)."""
    spectrum = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
    window = torch.hann_window(N_FFT, device=magnitude.device)
    return torch.istft(spectrum, N_FFT, hop_length=HOP, win_length=N_FFT, window=window)[:, :length]


def _stft(padded: torch.Tensor) -> torch.Tensor:
    window = torch.hann_window(N_FFT, device=padded.device)
    return torch.stft(
        padded,
        N_FFT,
        hop_length=HOP,
        win_length=N_FFT,
        window=window,
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )
