"""Temperature + top-k sampling, the reference's operations in the reference's order."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Temperatures outside this range are refused: far below it, logits / temperature overflows
# to infinity and sampling degenerates to code 0 (silence); far above, it is noise.
TEMPERATURE_RANGE = (0.01, 5.0)


def sample_topk(
    logits: torch.Tensor,
    topk: int | Sequence[int],
    temperature: float | Sequence[float],
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """One token id per row of logits [B, V]: a [B, 1] int64 tensor.

    Drawn as argmax(probs / E) with E ~ Exponential(1), which picks index i with probability
    probs[i] without a host sync; `generator` makes the draw reproducible.

    `topk`, `temperature` and `generator` are each either one value for every row or a
    sequence with one per row. Per-row values give every row exactly the token it would get
    if it were sampled alone with its own values: a row's noise comes from its own generator.
    """
    rows = logits.shape[0]
    per_row = [
        value is not None and not isinstance(value, (int, float, torch.Generator))
        for value in (topk, temperature, generator)
    ]
    if not any(per_row):
        return _sample(logits, topk, temperature, torch.empty_like(logits).exponential_(1, generator=generator))
    topks, temperatures, generators = (
        list(value) if is_list else [value] * rows for value, is_list in zip((topk, temperature, generator), per_row)
    )
    if not len(topks) == len(temperatures) == len(generators) == rows:
        raise ValueError(f"per-row sampling parameters must have one entry per row ({rows})")
    noise = torch.stack([_row_noise(logits[0], rng) for rng in generators])
    if len(set(topks)) == 1 and len(set(temperatures)) == 1:
        return _sample(logits, topks[0], temperatures[0], noise)
    return torch.cat([_sample(logits[i : i + 1], topks[i], temperatures[i], noise[i : i + 1]) for i in range(rows)])


def _row_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.empty_like(like).exponential_(1, generator=generator)


def _sample(logits: torch.Tensor, topk: int, temperature: float, noise: torch.Tensor) -> torch.Tensor:
    logits = logits / temperature
    threshold = torch.topk(logits, topk, dim=-1).values[..., -1:]
    logits = logits.masked_fill(logits < threshold, float("-inf"))
    probs = torch.softmax(torch.log_softmax(logits, dim=-1), dim=-1)
    return torch.argmax(probs / noise, dim=-1, keepdim=True)
