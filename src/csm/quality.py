"""How far a number format moves CSM's predictions: teacher-forced agreement with a reference.

Every model under test reads the same sequence (recorded speech with its transcript) and, at
each scored audio frame, predicts codebook 0 with the backbone and codebooks 1..31 with the
depth decoder, fed the true codes before them (teacher forcing). All models thus answer the
same questions, so their differences measure the number format, not diverging samples.

    sequence = teacher_forcing_sequence(tokenizer, mimi, prompt_segments("sesame/csm-1b"))
    reference = teacher_forced_logits(bf16_model, sequence)
    agreement = compare(reference, teacher_forced_logits(int8_model, sequence))
    agreement.top1[k], agreement.kl[k]     # codebook k: top-1 agreement, mean KL in nats
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from csm.errors import WeightsNotFoundError
from csm.generator import Segment
from csm.mimi import Mimi
from csm.model import CSM
from csm.text import audio_frames, text_frames
from csm.voices import VOICE_TRANSCRIPTS, load_voice

# Enough frames for a standard error of at most ~6 points on each codebook's top-1 agreement,
# few enough to score a full-size model in seconds per format on a CPU.
DEFAULT_FRAMES = 64

SYNTHETIC_TRANSCRIPTS = (
    "So I was walking home yesterday and it started to rain, really heavy rain.",
    "Oh no, did you have an umbrella with you, or did you just get soaked?",
)


@dataclass(frozen=True)
class ScoredSequence:
    """A prompt of text and audio positions and which of its audio frames are predicted.

    tokens, mask: [S, 33] as `csm.text` builds them. scored: [T] int64, positions holding
    an audio frame; each is predicted from the positions before it.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    scored: torch.Tensor


@dataclass(frozen=True)
class Agreement:
    """How a model's teacher-forced predictions compare with a reference's, per codebook.

    top1: [32], the fraction of scored frames whose most likely code is the reference's.
    kl: [32], the mean KL divergence KL(reference || model) of the code distributions, nats.
    """

    top1: torch.Tensor
    kl: torch.Tensor

    @property
    def top1_backbone(self) -> float:
        """Top-1 agreement of codebook 0, the backbone's prediction."""
        return float(self.top1[0])

    @property
    def top1_depth(self) -> float:
        """Mean top-1 agreement of codebooks 1..31, the depth decoder's predictions."""
        return float(self.top1[1:].mean())

    @property
    def kl_mean(self) -> float:
        """KL divergence averaged over frames and codebooks."""
        return float(self.kl.mean())


def prompt_segments(model_source: str | os.PathLike) -> tuple[list[Segment], str]:
    """The built-in voices of `model_source` when it has them, else synthetic speech-like audio.

    Returns the segments and a description of their source.
    """
    try:
        voices = [load_voice(name, speaker, model_source) for speaker, name in enumerate(sorted(VOICE_TRANSCRIPTS))]
    except WeightsNotFoundError:
        return synthetic_segments(), "synthetic audio (the model has no built-in voices)"
    return voices, "the built-in voices"


def synthetic_segments(seconds: float = 6.0, sample_rate: int = 24_000) -> list[Segment]:
    """Two deterministic utterances of voiced, syllable-like sound with their (made-up) transcripts."""
    return [
        Segment(speaker=speaker, text=text, audio=_speech_like(seconds, sample_rate, seed=speaker))
        for speaker, text in enumerate(SYNTHETIC_TRANSCRIPTS)
    ]


def _speech_like(seconds: float, sample_rate: int, seed: int) -> torch.Tensor:
    # A gliding pitch with five harmonics, opened and closed four times a second like
    # syllables, over a little breath noise.
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * sample_rate), dtype=torch.float64) / sample_rate
    pitch = 140 + 40 * seed + 25 * torch.sin(2 * torch.pi * 0.7 * t)
    phase = 2 * torch.pi * torch.cumsum(pitch, 0) / sample_rate
    voiced = sum(torch.sin(harmonic * phase) / harmonic for harmonic in range(1, 6))
    syllables = torch.sin(2 * torch.pi * 4 * t).clamp(min=0)
    noise = torch.randn(t.shape, generator=generator, dtype=torch.float64)
    return (0.2 * voiced * syllables + 0.01 * noise).float()


def teacher_forcing_sequence(
    tokenizer, mimi: Mimi, segments: Sequence[Segment], frames: int = DEFAULT_FRAMES
) -> ScoredSequence:
    """The segments as one prompt (as `Generator` builds it); the first `frames` audio frames
    of the last segment are scored, with everything before them as context."""
    if not segments:
        raise ValueError("teacher forcing needs at least one segment")
    if frames < 1:
        raise ValueError(f"frames must be positive, got {frames}")
    tokens, masks = [], []
    for segment in segments:
        for part_tokens, part_mask in (
            text_frames(tokenizer, segment.text, segment.speaker),
            audio_frames(_encode(mimi, segment.audio)),
        ):
            tokens.append(part_tokens)
            masks.append(part_mask)
    # The last segment's audio frames, its end-of-audio frame aside.
    audio_length = len(tokens[-1]) - 1
    start = sum(len(part) for part in tokens[:-1])
    scored = torch.arange(start, start + min(frames, audio_length))
    end = int(scored[-1]) + 1
    return ScoredSequence(torch.cat(tokens)[:end], torch.cat(masks)[:end], scored)


def _encode(mimi: Mimi, audio: torch.Tensor) -> torch.Tensor:
    parameter = next(mimi.parameters())
    with torch.inference_mode():
        return mimi.encode(audio.to(parameter.device, parameter.dtype)[None, None])[0].cpu()


def teacher_forced_logits(
    model: CSM, sequence: ScoredSequence, progress: Callable[[int], object] | None = None
) -> torch.Tensor:
    """What `model` predicts for every codebook of the scored frames: [T, 32, V] float32 logits, CPU.

    Runs in cache row 0 (setting up caches for one row if the model has none); `progress(1)`
    is called after each scored frame.
    """
    if not model.cache_rows:
        model.setup_caches(1)
    device = model.codebook_offsets.device
    tokens, mask = sequence.tokens.to(device), sequence.mask.to(device)
    logits = []
    with torch.inference_mode():
        positions = torch.arange(tokens.shape[0], device=device)
        hidden = model.backbone_hidden(tokens[None], mask[None], positions[None], rows=slice(0, 1))[0]
        for position in sequence.scored.tolist():
            state = hidden[position - 1 : position]
            codes = tokens[position : position + 1, :-1]
            backbone = model.codebook0_head(state)
            depth = model.depth_logits(state, codes)
            logits.append(torch.cat([backbone[:, None], depth], dim=1)[0].float().cpu())
            if progress is not None:
                progress(1)
    return torch.stack(logits)


def compare(reference: torch.Tensor, logits: torch.Tensor) -> Agreement:
    """Per-codebook top-1 agreement and mean KL(reference || logits) of [T, K, V] logits."""
    if reference.shape != logits.shape:
        raise ValueError(f"logits of shape {tuple(logits.shape)} cannot be compared with {tuple(reference.shape)}")
    top1 = (reference.argmax(-1) == logits.argmax(-1)).double().mean(0)
    # float64: differences between close formats are small against the log-probabilities.
    log_p = F.log_softmax(reference.double(), dim=-1)
    log_q = F.log_softmax(logits.double(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean(0)
    return Agreement(top1=top1.float(), kl=kl.float())
