"""csm.quality: teacher-forced logits and the agreement metrics, on cases with known answers."""

import copy
import math

import pytest
import torch

from csm.loading import load_for_generation
from csm.quality import (
    ScoredSequence,
    compare,
    prompt_segments,
    synthetic_segments,
    teacher_forced_logits,
    teacher_forcing_sequence,
)
from csm.text import text_frames
from csm.voices import VOICE_TRANSCRIPTS


@pytest.fixture(scope="module")
def sequence(assets, parts, mimi) -> ScoredSequence:
    segments, _ = prompt_segments(assets.model)
    return teacher_forcing_sequence(parts[1], mimi, segments, frames=4)


def test_compare_counts_top1_matches_per_codebook():
    reference = torch.zeros(4, 2, 3)
    reference[..., 0] = 1  # code 0 most likely everywhere
    logits = reference.clone()
    logits[1, 0] = torch.tensor([0.0, 5.0, 0.0])  # codebook 0 disagrees on one frame of four
    agreement = compare(reference, logits)
    assert agreement.top1.tolist() == [0.75, 1.0]
    assert agreement.top1_backbone == 0.75 and agreement.top1_depth == 1.0


def test_compare_gives_the_kl_divergence_of_the_softmaxes():
    reference = torch.zeros(1, 1, 3)  # uniform
    logits = torch.tensor([[[math.log(2), 0.0, 0.0]]])  # probabilities 1/2, 1/4, 1/4
    expected = (math.log(2 / 3) + 2 * math.log(4 / 3)) / 3
    assert compare(reference, logits).kl.item() == pytest.approx(expected, rel=1e-6)


def test_compare_rejects_logits_of_other_shapes():
    with pytest.raises(ValueError, match="cannot be compared"):
        compare(torch.zeros(2, 32, 5), torch.zeros(3, 32, 5))


def test_a_model_agrees_fully_with_itself(parts, sequence):
    model = parts[0]
    logits = teacher_forced_logits(model, sequence)
    assert logits.shape == (4, 32, 2051) and logits.dtype == torch.float32
    agreement = compare(logits, teacher_forced_logits(model, sequence))
    assert torch.equal(agreement.top1, torch.ones(32))
    assert torch.equal(agreement.kl, torch.zeros(32))


def test_a_perturbed_model_agrees_less_and_diverges(parts, sequence):
    reference = teacher_forced_logits(parts[0], sequence)
    perturbed = copy.deepcopy(parts[0])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.mul_(1 + 0.5 * torch.randn(parameter.shape, generator=generator))
    agreement = compare(reference, teacher_forced_logits(perturbed, sequence))
    assert agreement.top1.mean() < 0.5
    assert (agreement.kl > 0).all()


def test_teacher_forcing_predicts_the_models_own_greedy_frames(parts):
    """Frames sampled with top-k 1 are the argmax of what the model predicts: fed back as the
    reference, every codebook's teacher-forced argmax is the code that was sampled."""
    model, tokenizer = parts
    prompt, mask = text_frames(tokenizer, "Hello there.", 0)
    model.setup_caches(1)
    tokens, step_mask, positions = prompt[None], mask[None], torch.arange(len(prompt))[None]
    frames = []
    for _ in range(3):
        frame = model.generate_frame(tokens, step_mask, positions, temperature=1.0, topk=1)
        frames.append(frame[0])
        tokens = torch.cat([frame, frame.new_zeros(1, 1)], dim=1)[:, None]
        step_mask = torch.ones_like(tokens, dtype=torch.bool)
        step_mask[..., -1] = False
        positions = positions[:, -1:] + 1
    audio = torch.stack(frames)
    sequence = ScoredSequence(
        tokens=torch.cat([prompt, torch.cat([audio, audio.new_zeros(3, 1)], dim=1)]),
        mask=torch.cat([mask, step_mask[0].expand(3, -1)]),
        scored=torch.arange(len(prompt), len(prompt) + 3),
    )
    assert torch.equal(teacher_forced_logits(model, sequence).argmax(-1), audio)


def test_the_sequence_scores_the_first_frames_of_the_last_segment(assets, parts, mimi):
    segments, source = prompt_segments(assets.model)
    assert source == "the built-in voices"
    assert [segment.text for segment in segments] == [VOICE_TRANSCRIPTS[name] for name in sorted(VOICE_TRANSCRIPTS)]
    sequence = teacher_forcing_sequence(parts[1], mimi, segments, frames=3)
    assert len(sequence.scored) == 3 and int(sequence.scored[-1]) == len(sequence.tokens) - 1
    # Scored positions hold audio frames: all 32 code slots set, the text slot empty.
    assert sequence.mask[sequence.scored, :-1].all() and not sequence.mask[sequence.scored, -1].any()
    # Before them: the last segment's text, which follows the first segment's end-of-audio frame.
    start = int(sequence.scored[0])
    assert sequence.mask[start - 1, -1] and not sequence.mask[start - 1, :-1].any()


def test_without_built_in_voices_the_prompt_is_synthetic(tmp_path):
    segments, source = prompt_segments(tmp_path)
    assert source.startswith("synthetic audio")
    assert [segment.speaker for segment in segments] == [0, 1]
    again = synthetic_segments()
    assert all(torch.equal(a.audio, b.audio) for a, b in zip(segments, again))
    assert all(0.05 < segment.audio.abs().max() < 1 for segment in segments)


def test_both_int8_modes_are_scored_and_weight_only_is_nearer(assets, sequence):
    """What `csm bench --quality` reports for the two int8 modes: int8-dynamic also rounds the
    activations, so it moves the predictions more than weight-only int8, and both stay near bf16."""
    reference = teacher_forced_logits(load_for_generation(assets.model, dtype=torch.bfloat16), sequence)
    scores = {
        mode: compare(reference, teacher_forced_logits(load_for_generation(assets.model, quantize=mode), sequence))
        for mode in ("int8", "int8-dynamic")
    }
    # Measured on this tiny model: KL 1.6e-4 and 3.2e-4, top-1 94.5% and 93.8%.
    assert 0 < scores["int8"].kl_mean < scores["int8-dynamic"].kl_mean < 0.01
    assert float(scores["int8-dynamic"].top1.mean()) > 0.8
