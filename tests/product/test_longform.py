"""Long text and conversations: each chunk hears the prompts and as much recent speech as fits."""

import torch

from csm import Segment
from csm.longform import Turn, fit_context, generate_turns
from tests.product.conftest import speech_like


def test_each_turn_hears_the_prompts_and_the_turns_before(plain_generator, monkeypatch):
    stream = plain_generator.generate_stream
    contexts = []

    def spy(text, speaker, context, **kwargs):
        contexts.append(list(context))
        return stream(text, speaker, context, **kwargs)

    monkeypatch.setattr(plain_generator, "generate_stream", spy)
    prompt = Segment(1, "A voice.", speech_like(0.2))
    heard = []
    turns = [Turn(0, "Hey, how are you?"), Turn(1, "Pretty good.")]
    segments = generate_turns(plain_generator, turns, [prompt], max_audio_length_ms=240, seed=1, on_chunk=heard.append)

    assert [(segment.speaker, segment.text) for segment in segments] == [(0, "Hey, how are you?"), (1, "Pretty good.")]
    assert contexts == [[prompt], [prompt, segments[0]]]
    assert all(segment.audio.numel() == 3 * 1920 for segment in segments)
    assert torch.equal(torch.cat(heard), torch.cat([segment.audio for segment in segments]))
    again = generate_turns(plain_generator, turns, [prompt], max_audio_length_ms=240, seed=1)
    assert all(torch.equal(a.audio, b.audio) for a, b in zip(segments, again))


def test_the_oldest_speech_is_dropped_first_when_the_budget_is_short(plain_generator):
    prompts = [Segment(0, "The voice.", speech_like(0.3, seed=1))]
    history = [Segment(0, f"Chunk {i}.", speech_like(0.4, seed=2 + i)) for i in range(3)]
    turn = Turn(0, "Next chunk.")
    fits = plain_generator.prompt_length(turn.text, turn.speaker, prompts + history[1:])
    # The longest generation that still leaves exactly `fits` positions for the prompt.
    max_ms = (2048 - 1 - fits) * 80
    assert fit_context(plain_generator, turn, prompts, history, max_ms) == prompts + history[1:]
    assert fit_context(plain_generator, turn, prompts, history, 80) == prompts + history
    assert fit_context(plain_generator, turn, prompts, history, 2040 * 80) == prompts
