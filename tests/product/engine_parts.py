"""Networks for the batching tests: the tiny CSM of the product tests and a tiny Mimi.

The engine decodes every frame of every request with Mimi; a full-size random Mimi would make
these tests slow, and decoding is not what they check.
"""

from __future__ import annotations

import torch

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
