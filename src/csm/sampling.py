"""Temperature + top-k sampling, the reference's operations in the reference's order."""

from __future__ import annotations

import torch


def sample_topk(
    logits: torch.Tensor, topk: int, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token id per row of logits [B, V]: a [B, 1] int64 tensor.

    Drawn as argmax(probs / E) with E ~ Exponential(1), which picks index i with probability
    probs[i] without a host sync; `generator` makes the draw reproducible.
    """
    logits = logits / temperature
    threshold = torch.topk(logits, topk, dim=-1).values[..., -1:]
    logits = logits.masked_fill(logits < threshold, float("-inf"))
    probs = torch.softmax(torch.log_softmax(logits, dim=-1), dim=-1)
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.argmax(probs / noise, dim=-1, keepdim=True)
