"""Our Mimi against transformers `MimiModel` on the same random weights: identical codes,
decoded audio within 1e-5 relative."""

from __future__ import annotations

import pytest
import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def reference_codes(reference, wav: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return reference.encode(wav).audio_codes


def reference_audio(reference, codes: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return reference.decode(codes).audio_values


@pytest.mark.parametrize(
    ("batch", "length"),
    [(1, 4 * 1920), (2, 3 * 1920 + 77), (1, 1000)],
    ids=["multiple-of-frame", "not-a-multiple", "shorter-than-a-frame"],
)
def test_full_size_matches_transformers(reference_pair, batch, length):
    reference, ours = reference_pair
    wav = 0.1 * torch.randn(batch, 1, length, generator=torch.Generator().manual_seed(length))

    codes = ours.encode(wav)
    expected_codes = reference_codes(reference, wav)
    assert codes.dtype == torch.int64
    assert codes.shape == (batch, 32, -(-length // 1920))
    assert torch.equal(codes, expected_codes)

    audio = ours.decode(codes)
    expected_audio = reference_audio(reference, codes)
    assert audio.shape == (batch, 1, codes.shape[-1] * 1920)
    assert relative_error(audio, expected_audio) < 1e-5


def test_longer_than_attention_window_matches_transformers(tiny_reference_pair):
    # 10.5 s = 263 steps at 25 Hz: queries past step 250 must no longer see the first steps.
    reference, ours = tiny_reference_pair
    wav = 0.1 * torch.randn(1, 1, 252_000, generator=torch.Generator().manual_seed(0))

    codes = ours.encode(wav)
    assert codes.shape == (1, 8, 132)
    assert torch.equal(codes, reference_codes(reference, wav))
    assert relative_error(ours.decode(codes), reference_audio(reference, codes)) < 1e-5
