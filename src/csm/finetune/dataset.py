"""From a dataset path to training sequences: read, check, encode (cached), build, split off eval."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from csm.finetune.codes import AudioFileCodeCache, encode_dataset
from csm.finetune.data import Conversation, DataError, problem_handler, read_dataset
from csm.finetune.sequences import Example, build_examples


@dataclass(frozen=True)
class Prepared:
    conversations: list[Conversation]
    examples: list[Example]


def prepare(
    path: str | Path,
    cache: AudioFileCodeCache,
    tokenizer,
    max_positions: int,
    on_error: str = "fail",
    *,
    desc: str = "encoding audio",
) -> Prepared:
    """Every usable conversation of the dataset at `path` and its training sequences.

    Broken entries fail the run (`on_error="fail"`) or are reported on stderr and skipped.
    """
    handle = problem_handler(on_error, _warn)
    conversations = read_dataset(path, on_error, _warn)
    usable, examples = [], []
    for conversation, codes in encode_dataset(conversations, cache, handle, desc=desc):
        try:
            built = build_examples(conversation, codes, tokenizer, max_positions)
        except DataError as error:
            handle(error)
            continue
        usable.append(conversation)
        examples.extend(built)
    if not examples:
        raise DataError(f"dataset {path} holds no usable conversation")
    return Prepared(usable, examples)


def split_off(prepared: Prepared, fraction: float, seed: int) -> tuple[Prepared, Prepared]:
    """(training, evaluation): a random `fraction` of the conversations (at least one) held out."""
    if not 0 < fraction < 1:
        raise ValueError(f"the eval split must be a fraction between 0 and 1, got {fraction:g}")
    count = len(prepared.conversations)
    held = max(1, round(fraction * count))
    if held >= count:
        raise ValueError(f"an eval split of {fraction:g} leaves no training data of {count} conversations")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = {prepared.conversations[index].where for index in order[:held]}

    def part(keep) -> Prepared:
        return Prepared(
            [conversation for conversation in prepared.conversations if keep(conversation.where in held_out)],
            [example for example in prepared.examples if keep(example.where in held_out)],
        )

    return part(lambda held: not held), part(lambda held: held)


def _warn(error: DataError) -> None:
    print(f"csm: skipped: {error}", file=sys.stderr)
