"""Our Mimi against kyutai's moshi 0.2.2 (the Mimi that CSM ran) on the same moshi-layout
file: whole-signal and streaming encode give the same codes, decode the same audio.

moshi is a test-only oracle: `pip install --no-deps moshi==0.2.2 einops sentencepiece`.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

import pytest
import torch

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # read by moshi at import
from moshi.models.loaders import get_mimi  # noqa: E402


@pytest.fixture(autouse=True)
def no_bitsandbytes(monkeypatch):
    # moshi 0.2.2 imports bitsandbytes in every linear layer, but only uses it for int8
    # weights, which a float checkpoint never has.
    monkeypatch.setitem(sys.modules, "bitsandbytes", ModuleType("bitsandbytes"))


@pytest.fixture(scope="module")
def moshi(moshi_checkpoint):
    return get_mimi(moshi_checkpoint, num_codebooks=32).eval()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def test_encode_of_a_length_that_is_not_a_frame_multiple(mimi, moshi):
    wav = 0.1 * torch.randn(2, 1, 3 * 1920 + 77, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = moshi.encode(wav)
    assert torch.equal(mimi.encode(wav), expected)


def test_streaming_decode_frame_by_frame(mimi, moshi):
    codes = torch.randint(0, 2048, (2, 32, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), moshi.streaming(2):
        expected = torch.cat([moshi.decode(codes[..., t : t + 1]) for t in range(3)], dim=-1)
    stream = mimi.decode_stream(batch_size=2)
    streamed = torch.cat([stream.step(codes[..., t : t + 1]) for t in range(3)], dim=-1)
    assert relative_error(streamed, expected) < 1e-5


def test_streaming_encode_frame_by_frame(mimi, moshi):
    frames = torch.split(0.1 * torch.randn(2, 1, 3 * 1920, generator=torch.Generator().manual_seed(2)), 1920, dim=-1)
    with torch.no_grad(), moshi.streaming(2):
        expected = torch.cat([moshi.encode(frame) for frame in frames], dim=-1)
    stream = mimi.encode_stream(batch_size=2)
    assert torch.equal(torch.cat([stream.step(frame) for frame in frames], dim=-1), expected)
