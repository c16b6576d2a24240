"""The public surface of `csm.mimi.Mimi`: constants, shapes, codebook counts, bad input."""

from __future__ import annotations

import pytest
import torch

from csm.mimi import Mimi


def test_constants(mimi):
    assert (mimi.sample_rate, mimi.frame_rate, mimi.frame_size, mimi.num_codebooks) == (24000, 12.5, 1920, 32)


def test_fewer_codebooks_are_the_leading_ones(moshi_checkpoint, mimi):
    wav = 0.1 * torch.randn(1, 1, 2 * 1920, generator=torch.Generator().manual_seed(0))
    eight = Mimi.from_pretrained(moshi_checkpoint, num_codebooks=8)
    codes = eight.encode(wav)
    assert codes.shape == (1, 8, 2)
    assert torch.equal(codes, mimi.encode(wav)[:, :8])
    assert mimi.decode(codes).shape == (1, 1, 2 * 1920)


def test_num_codebooks_out_of_range(moshi_checkpoint):
    with pytest.raises(ValueError, match="1..32"):
        Mimi.from_pretrained(moshi_checkpoint, num_codebooks=33)


@pytest.mark.parametrize(
    ("wav", "message"),
    [
        (torch.zeros(1920), r"\[batch, 1, samples\]"),
        (torch.zeros(1, 1920), r"\[batch, 1, samples\]"),
        (torch.zeros(1, 2, 1920), "1 channel, got 2"),
        (torch.zeros(1, 1, 0), "empty"),
        (torch.zeros(1, 1, 1920, dtype=torch.int16), "floating point"),
        (torch.tensor([[[0.0, float("nan")]]]), "NaN or infinite"),
        (torch.tensor([[[0.0, float("inf")]]]), "NaN or infinite"),
    ],
    ids=["rank-1", "rank-2", "stereo", "empty", "integer", "nan", "inf"],
)
def test_encode_rejects_bad_audio(mimi, wav, message):
    with pytest.raises(ValueError, match=message):
        mimi.encode(wav)


@pytest.mark.parametrize(
    ("codes", "message"),
    [
        (torch.zeros(32, 4, dtype=torch.long), r"\[batch, codebooks, frames\]"),
        (torch.zeros(1, 32, 0, dtype=torch.long), "empty"),
        (torch.zeros(1, 33, 2, dtype=torch.long), "1..32 codebooks"),
        (torch.zeros(1, 32, 2), "integers"),
        (torch.full((1, 32, 2), 2050), r"0..2047, got values in 2050..2050"),
        (torch.full((1, 32, 2), -1), "0..2047"),
    ],
    ids=["rank-2", "empty", "too-many-codebooks", "float", "too-large", "negative"],
)
def test_decode_rejects_bad_codes(mimi, codes, message):
    with pytest.raises(ValueError, match=message):
        mimi.decode(codes)
