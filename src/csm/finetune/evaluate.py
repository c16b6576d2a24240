"""Evaluation users can trust: the loss on every frame, and audio samples to listen to.

The eval loss uses all frames for the depth decoder (no random selection), so it is the same
number from run to run for the same weights. Samples speak the last trained segment of a few
eval conversations, with the segments before it as context; the share of them that end
with an end-of-speech frame before the length limit shows whether the model learned to stop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from csm.audio import load_audio, save_audio
from csm.finetune.batches import bucket, collate
from csm.finetune.data import Conversation
from csm.finetune.loss import loss_terms
from csm.finetune.sequences import Example
from csm.generator import FRAME_MS, Generator, Segment
from csm.model import CSM


@dataclass(frozen=True)
class EvalResult:
    backbone_loss: float
    decoder_loss: float

    @property
    def loss(self) -> float:
        return self.backbone_loss + self.decoder_loss


@torch.no_grad()
def eval_loss(model: CSM, examples: Sequence[Example], batch_frames: int, device: torch.device, autocast) -> EvalResult:
    """Per-token mean of both terms over every frame of `examples` (fixed order, no sampling)."""
    backbone = decoder = 0.0
    backbone_tokens = decoder_tokens = 0
    lengths = [len(example) for example in examples]
    for group in bucket(lengths, batch_frames, torch.Generator().manual_seed(0)):
        batch = collate([examples[index] for index in group], ratio=1.0, generator=None).to(device)
        with autocast():
            terms = loss_terms(model, batch)
        backbone += float(terms.backbone_sum)
        decoder += float(terms.decoder_sum)
        backbone_tokens += terms.backbone_tokens
        decoder_tokens += terms.decoder_tokens
    return EvalResult(backbone / backbone_tokens, decoder / decoder_tokens)


def write_samples(
    generator: Generator, conversations: Sequence[Conversation], folder: Path, step: int, max_seconds: float, seed: int
) -> float:
    """Speak up to len(conversations) eval prompts into `folder` (watermarked); returns the share that
    ended with an end-of-speech frame before `max_seconds`."""
    folder.mkdir(parents=True, exist_ok=True)
    max_samples = int(max_seconds * 1000 / FRAME_MS) * generator.sample_rate * FRAME_MS // 1000
    ended = 0
    for index, conversation in enumerate(conversations):
        last = max(i for i, segment in enumerate(conversation.segments) if segment.train)
        context = [
            Segment(segment.speaker, segment.text, load_audio(segment.audio, generator.sample_rate))
            for segment in conversation.segments[:last]
        ]
        target = conversation.segments[last]
        audio = generator.generate(
            target.text, target.speaker, context, max_audio_length_ms=max_seconds * 1000, seed=seed + index
        )
        ended += audio.numel() < max_samples
        if audio.numel():
            save_audio(folder / f"step{step:06d}_{index}.wav", audio.cpu(), generator.sample_rate)
    return ended / len(conversations)


@contextlib.contextmanager
def inference_caches(model: CSM):
    """Caches for one sequence while sampling, then back to the cache-free training forward."""
    try:
        yield
    finally:
        for llama in (model.backbone, model.decoder):
            for layer in llama.layers:
                layer.attn.cache = None
