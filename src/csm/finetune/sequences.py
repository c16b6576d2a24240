"""Conversations as training sequences, position by position exactly as the inference prompt.

Each segment is its text tokens (`"[speaker]text"` with BOS and EOS), then its Mimi codes one
frame per position, then the all-zero end-of-audio frame. The frames of a trained segment,
its end-of-audio frame included, are the loss targets; a `train: false` segment is context.
A conversation longer than the model's context is split at segment boundaries; a single
segment that does not fit is an error naming its line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from csm.finetune.data import Conversation, DataError
from csm.text import audio_frames, text_frames


@dataclass(frozen=True)
class Example:
    """One training sequence: tokens and mask [S, 33], and which positions are trained frames."""

    tokens: torch.Tensor
    mask: torch.Tensor
    # [S] bool: the audio frame at this position is a target (end-of-audio frames included)
    trained: torch.Tensor
    # [S] bool: the position holds a trained end-of-audio frame
    end_of_audio: torch.Tensor
    where: str

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_frames(self) -> int:
        return int(self.trained.sum())


def build_examples(
    conversation: Conversation, codes: Sequence[torch.Tensor], tokenizer, max_positions: int
) -> list[Example]:
    """The training sequences of one conversation (several when it must be split)."""
    parts = [
        _segment_part(tokenizer, segment.text, segment.speaker, segment_codes, segment.train)
        for segment, segment_codes in zip(conversation.segments, codes, strict=True)
    ]
    for index, part in enumerate(parts):
        if part[0].shape[0] > max_positions:
            raise DataError(
                f"{conversation.where}: segment {index} takes {part[0].shape[0]} positions, more than the "
                f"model's {max_positions} (one position = 80 ms of audio or one text token); cut it shorter"
            )
    examples = []
    for chunk in _chunks([part[0].shape[0] for part in parts], max_positions):
        chosen = [parts[index] for index in chunk]
        if any(part[2].any() for part in chosen):
            tokens, mask, trained, end = (torch.cat(column) for column in zip(*chosen, strict=True))
            examples.append(Example(tokens, mask, trained, end, conversation.where))
    return examples


def _segment_part(tokenizer, text: str, speaker: int, codes: torch.Tensor, train: bool):
    text_tokens, text_mask = text_frames(tokenizer, text, speaker)
    audio_tokens, audio_mask = audio_frames(codes)
    tokens = torch.cat([text_tokens, audio_tokens])
    mask = torch.cat([text_mask, audio_mask])
    trained = torch.zeros(tokens.shape[0], dtype=torch.bool)
    end = torch.zeros_like(trained)
    if train:
        trained[text_tokens.shape[0] :] = True
        end[-1] = True
    return tokens, mask, trained, end


def _chunks(lengths: list[int], max_positions: int) -> list[list[int]]:
    """Consecutive segments grouped greedily into chunks of at most `max_positions`."""
    chunks: list[list[int]] = [[]]
    total = 0
    for index, length in enumerate(lengths):
        if chunks[-1] and total + length > max_positions:
            chunks.append([])
            total = 0
        chunks[-1].append(index)
        total += length
    return chunks
