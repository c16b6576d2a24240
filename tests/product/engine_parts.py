"""Networks for the batching tests: the tiny CSM of the product tests and a tiny Mimi.

The engine decodes every frame of every request with Mimi; a full-size random Mimi would make
these tests slow, and decoding is not what they check.
"""

from __future__ import annotations

import torch

from csm.engine import Request
from csm.generator import Generator
from csm.mimi import Mimi, MimiConfig

# The real strides (1920 samples per frame) and 32 codebooks of 2048 entries, narrow layers.
TINY_MIMI = MimiConfig(num_filters=8, dim=64, num_layers=1, num_heads=1, ffn_dim=128, codebook_dim=16)


def tiny_mimi(seed: int = 0) -> Mimi:
    """A tiny Mimi with seeded random weights whose codebooks hold distinct entries."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mimi = Mimi(TINY_MIMI)
        for name, buffer in mimi.named_buffers():
            if name.endswith("codebooks"):
                buffer.normal_()
    return mimi.eval().requires_grad_(False)


def alone(generator: Generator, request: Request) -> torch.Tensor:
    """What `generate_stream` gives for `request` by itself (the engine's chunks are not watermarked)."""
    return torch.cat(list(generator.generate_stream(*request.arguments()[:-1], seed=request.seed)))


def joined(handle) -> torch.Tensor:
    return torch.cat(list(handle))


def assert_same_audio(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # Rows of one batched Mimi step differ from a lone decode by float rounding only; other
    # codes would change the audio entirely.
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
