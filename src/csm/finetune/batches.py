"""Length-bucketed batches, padded only to their longest sequence, and the depth-decoder frames.

Sequences of similar length share a batch (at most `batch_frames` positions in all, padding
included), so nothing is padded to a fixed length. The depth decoder learns from a random
`decoder_frame_ratio` of each sequence's trained frames (the paper's compute amortization):
round(ratio x frames) of them, at least one, and every end-of-audio frame always.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from csm.finetune.sequences import Example


@dataclass(frozen=True)
class TrainingBatch:
    """A batch of training sequences: frames, their mask and positions, and which frames each loss reads."""

    tokens: torch.Tensor  # [B, S, 33] int64
    mask: torch.Tensor  # [B, S, 33] bool
    positions: torch.Tensor  # [B, S] int64
    # (row, position) of every trained frame: the backbone's codebook-0 targets
    frames: tuple[torch.Tensor, torch.Tensor]
    # (row, position) of the frames the depth decoder learns codebooks 1..31 from
    decoder_frames: tuple[torch.Tensor, torch.Tensor]

    @property
    def num_positions(self) -> int:
        return self.tokens.shape[0] * self.tokens.shape[1]

    def to(self, device: torch.device) -> TrainingBatch:
        return TrainingBatch(
            self.tokens.to(device),
            self.mask.to(device),
            self.positions.to(device),
            tuple(index.to(device) for index in self.frames),
            tuple(index.to(device) for index in self.decoder_frames),
        )


def bucket(lengths: Sequence[int], batch_frames: int, generator: torch.Generator) -> list[list[int]]:
    """Indices grouped into batches of similar length, in random order; the order of the
    groups and of equal lengths within them comes from `generator`."""
    shuffled = torch.randperm(len(lengths), generator=generator).tolist()
    ordered = sorted(shuffled, key=lambda index: lengths[index])
    groups: list[list[int]] = [[]]
    for index in ordered:
        longest = lengths[index]  # sorted: the newest is the longest
        if groups[-1] and (len(groups[-1]) + 1) * longest > batch_frames:
            groups.append([])
        groups[-1].append(index)
    order = torch.randperm(len(groups), generator=generator).tolist()
    return [groups[index] for index in order]


def decoder_frame_count(num_frames: int, num_end_frames: int, ratio: float) -> int:
    """How many of a sequence's trained frames the depth decoder learns from."""
    return min(num_frames, max(1, num_end_frames, round(ratio * num_frames)))


def select_decoder_frames(example: Example, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    """Positions [K] (sorted) of the frames the depth decoder learns from in `example`."""
    frames = example.trained.nonzero().squeeze(1)
    end = example.end_of_audio[frames]
    count = decoder_frame_count(len(frames), int(end.sum()), ratio)
    if count == len(frames):
        return frames
    others = frames[~end]
    picked = others[torch.randperm(len(others), generator=generator)[: count - int(end.sum())]]
    return torch.cat([frames[end], picked]).sort().values


def collate(examples: Sequence[Example], ratio: float, generator: torch.Generator | None) -> TrainingBatch:
    """Right-pad `examples` to the longest; padded positions come after every real one, so the
    causal mask keeps them out of sight, and they are never targets."""
    length = max(len(example) for example in examples)
    tokens = torch.zeros(len(examples), length, examples[0].tokens.shape[1], dtype=torch.long)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    frames, decoder_frames = [], []
    for row, example in enumerate(examples):
        tokens[row, : len(example)] = example.tokens
        mask[row, : len(example)] = example.mask
        positions = example.trained.nonzero().squeeze(1)
        frames.append(torch.stack([torch.full_like(positions, row), positions]))
        chosen = select_decoder_frames(example, ratio, generator)
        decoder_frames.append(torch.stack([torch.full_like(chosen, row), chosen]))
    positions = torch.arange(length).expand(len(examples), -1).contiguous()
    return TrainingBatch(
        tokens, mask, positions, tuple(torch.cat(frames, dim=1)), tuple(torch.cat(decoder_frames, dim=1))
    )
