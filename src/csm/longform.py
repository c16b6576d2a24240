"""Speech longer than one generation: sentence chunks and conversations that carry their past.

CSM speaks one utterance per call, and prompt plus output must fit in 2048 positions. Long
text is therefore split at sentence boundaries and generated chunk by chunk; each chunk
gets the fixed prompts (voices) plus as many of the most recent generated chunks as fit,
so the voice stays the same from one chunk to the next. A conversation is the same loop
with the speaker changing from turn to turn.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from csm.generator import Generator, Segment

# A sentence ends at . ! ? or an ellipsis, possibly followed by closing quotes or brackets.
_SENTENCE_END = re.compile(r"([.!?\u2026][\"'\u201d\u2019)\]]*) ")
_CLAUSE_END = re.compile(r"(?<=[,;:\u2014])\s+")


@dataclass(frozen=True)
class Turn:
    """One utterance to generate: who says what."""

    speaker: int
    text: str


def split_sentences(text: str, max_chars: int = 250) -> list[str]:
    """`text` cut into chunks of whole sentences, each at most `max_chars` long where possible.

    Consecutive short sentences share a chunk (CSM phrases better with some text to go
    on); a sentence longer than `max_chars` is cut at clause punctuation, then at spaces.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    pieces = []
    # With whitespace collapsed to single spaces, a newline can mark the sentence ends.
    for sentence in _SENTENCE_END.sub("\\1\n", " ".join(text.split())).split("\n"):
        pieces.extend(_cut_long(sentence, max_chars))
    chunks: list[str] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + 1 + len(piece) <= max_chars:
            chunks[-1] = f"{chunks[-1]} {piece}"
        else:
            chunks.append(piece)
    return chunks


def _cut_long(sentence: str, max_chars: int) -> list[str]:
    if len(sentence) <= max_chars:
        return [sentence] if sentence else []
    parts = _CLAUSE_END.split(sentence)
    if len(parts) == 1:
        parts = sentence.split(" ")
    if len(parts) == 1:
        return [sentence]
    cut: list[str] = []
    for part in parts:
        if cut and len(cut[-1]) + 1 + len(part) <= max_chars:
            cut[-1] = f"{cut[-1]} {part}"
        else:
            cut.extend(_cut_long(part, max_chars))
    return cut


def fit_context(
    generator: Generator,
    turn: Turn,
    prompts: Sequence[Segment],
    history: Sequence[Segment],
    max_audio_length_ms: float,
) -> list[Segment]:
    """`prompts` plus the longest recent tail of `history` that leaves room to generate `turn`.

    If the prompts alone do not fit, they are returned anyway: generation then raises the
    context-length error, which says by how much to shorten them.
    """
    budget = generator.max_prompt_length(max_audio_length_ms)
    for start in range(len(history) + 1):
        context = [*prompts, *history[start:]]
        if generator.prompt_length(turn.text, turn.speaker, context) <= budget:
            return context
    return list(prompts)


def generate_turns(
    generator: Generator,
    turns: Sequence[Turn],
    prompts: Sequence[Segment] = (),
    *,
    max_audio_length_ms: float = 30_000,
    temperature: float = 0.9,
    topk: int = 50,
    seed: int | None = None,
    on_chunk: Callable[[torch.Tensor], None] | None = None,
) -> list[Segment]:
    """Generate `turns` in order, each with the prompts and the earlier turns as context.

    Returns one segment per turn with its audio before watermarking (join them and pass
    the result to `generator.watermark`). `on_chunk` sees every streamed audio chunk as
    it is decoded, unmarked (mark a live stream with `csm.watermark.stream.ClipMarker`);
    turn i is seeded with `seed + i` when a seed is given.
    """
    generated: list[Segment] = []
    for index, turn in enumerate(turns):
        # A turn that ended at once has no audio to learn the voice from.
        history = [segment for segment in generated if segment.audio.numel() > 0]
        context = fit_context(generator, turn, prompts, history, max_audio_length_ms)
        chunks = []
        for chunk in generator.generate_stream(
            turn.text,
            turn.speaker,
            context,
            max_audio_length_ms=max_audio_length_ms,
            temperature=temperature,
            topk=topk,
            seed=None if seed is None else seed + index,
            watermark=False,
        ):
            chunks.append(chunk)
            if on_chunk is not None:
                on_chunk(chunk)
        audio = torch.cat(chunks) if chunks else torch.zeros(0)
        generated.append(Segment(speaker=turn.speaker, text=turn.text, audio=audio))
    return generated
