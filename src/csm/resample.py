"""Windowed-sinc resampling that reproduces torchaudio's default `functional.resample`.

The reference watermarks CSM's 24 kHz output by resampling it to 44.1 kHz and back with
torchaudio (Hann window, 6 zero crossings, rolloff 0.99). torchaudio does not exist for
every torch, so the same filter is built here; its samples match torchaudio's, which
keeps our watermarked audio equal to the reference's.

The rates are reduced by their gcd (24000 -> 44100 becomes 80 -> 147): output sample
`j + k*new` uses the same filter taps as output `j` on the input shifted by `k*orig`, so
the whole resampler is one strided conv1d with `new` output channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOWPASS_FILTER_WIDTH = 6
ROLLOFF = 0.99


def resample(audio: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """`audio` (..., L) at `orig_rate` as (..., ceil(L * new_rate / orig_rate)) at `new_rate`.

    The filter is built in `audio`'s dtype on `audio`'s device, as torchaudio does.
    """
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} and {new_rate}")
    if not audio.is_floating_point():
        raise ValueError(f"audio must be a floating point tensor, got {audio.dtype}")
    if orig_rate == new_rate:
        return audio
    gcd = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // gcd, new_rate // gcd
    kernel, width = _sinc_kernel(orig, new, audio.dtype, audio.device)
    length = audio.shape[-1]
    flat = audio.reshape(-1, 1, length)
    # Pad so that every output phase sees `width` inputs on each side of its centre.
    padded = F.pad(flat, (width, width + orig))
    phases = F.conv1d(padded, kernel, stride=orig)  # (N, new, blocks)
    resampled = phases.transpose(1, 2).reshape(flat.shape[0], -1)
    target_length = math.ceil(new * length / orig)
    return resampled[:, :target_length].reshape(*audio.shape[:-1], -1)


def _sinc_kernel(orig: int, new: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, int]:
    """Filter taps (new, 1, 2*width + orig) for the reduced rates, and the half width."""
    # Cut off a little below the lower Nyquist frequency to avoid aliasing.
    cutoff = min(orig, new) * ROLLOFF
    width = math.ceil(LOWPASS_FILTER_WIDTH * orig / cutoff)
    input_times = torch.arange(-width, width + orig, dtype=dtype, device=device)[None, None] / orig
    output_times = torch.arange(0, -new, -1, dtype=dtype, device=device)[:, None, None] / new
    t = (output_times + input_times) * cutoff
    t = t.clamp(-LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH)
    window = torch.cos(t * math.pi / LOWPASS_FILTER_WIDTH / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), t.sin() / t)
    return sinc * (window * (cutoff / orig)), width
