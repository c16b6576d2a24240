"""The Generator end to end on a tiny random CSM, a random full-size Mimi and a tiny tokenizer."""

import pytest
import torch

from csm import Segment, load_csm_1b
from csm.errors import WeightsNotFoundError
from csm.text import text_frames
from tests.product.conftest import speech_like

FRAME = 1920


def test_output_is_mono_float32_at_24_khz_whole_frames(generator):
    audio = generator.generate("Hello there.", 0, [], max_audio_length_ms=400, seed=0)
    assert generator.sample_rate == 24_000
    assert audio.dtype == torch.float32 and audio.ndim == 1
    # A random model never samples the all-zero end frame: it runs to the limit.
    assert audio.numel() == 5 * FRAME
    assert torch.isfinite(audio).all()


def test_the_reference_call_runs_unchanged(generator):
    context = [Segment(speaker=1, text="Hi.", audio=speech_like(0.2))]
    audio = generator.generate(text="Hello.", speaker=0, context=context, max_audio_length_ms=160)
    assert audio.shape == (2 * FRAME,)


def test_an_all_zero_frame_ends_speech_and_is_not_emitted(plain_generator, monkeypatch):
    model = plain_generator._model
    sample = model.sample_frame
    calls = []

    def speak_three_frames(*args, **kwargs):
        frame = sample(*args, **kwargs)
        calls.append(frame)
        return torch.zeros_like(frame) if len(calls) > 3 else frame

    monkeypatch.setattr(model, "sample_frame", speak_three_frames)
    audio = plain_generator.generate("Hello.", 0, [], max_audio_length_ms=10_000, seed=0)
    assert audio.numel() == 3 * FRAME
    assert len(calls) == 4


def test_same_seed_same_audio_other_seed_other_audio(plain_generator):
    first = plain_generator.generate("Hello.", 0, [], max_audio_length_ms=240, seed=7)
    again = plain_generator.generate("Hello.", 0, [], max_audio_length_ms=240, seed=7)
    other = plain_generator.generate("Hello.", 0, [], max_audio_length_ms=240, seed=8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_the_watermark_changes_the_audio_only_slightly(generator, plain_generator):
    marked = generator.generate("Hello.", 0, [], max_audio_length_ms=480, seed=3)
    plain = plain_generator.generate("Hello.", 0, [], max_audio_length_ms=480, seed=3)
    assert marked.shape == plain.shape
    assert not torch.equal(marked, plain)
    assert torch.allclose(generator.watermark(plain), marked)


def test_streamed_chunks_join_to_the_generated_audio(generator, plain_generator):
    context = [Segment(speaker=0, text="Earlier words.", audio=speech_like(0.25))]
    chunks = list(
        plain_generator.generate_stream("Hello.", 1, context, max_audio_length_ms=320, seed=5, chunk_frames=3)
    )
    assert [chunk.numel() for chunk in chunks] == [3 * FRAME, FRAME]
    assert all(chunk.dtype == torch.float32 for chunk in chunks)
    streamed = torch.cat(chunks)
    whole = plain_generator.generate("Hello.", 1, context, max_audio_length_ms=320, seed=5)
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-5)
    marked = generator.generate("Hello.", 1, context, max_audio_length_ms=320, seed=5)
    torch.testing.assert_close(generator.watermark(streamed), marked, rtol=0, atol=1e-4)


def test_a_new_generation_invalidates_an_unfinished_stream(plain_generator):
    stream = plain_generator.generate_stream("Hello.", 0, [], max_audio_length_ms=400, seed=0)
    next(stream)
    plain_generator.generate("Other.", 0, [], max_audio_length_ms=80, seed=0)
    with pytest.raises(RuntimeError, match="another generation started"):
        next(stream)


def test_an_owner_claims_the_model_and_releases_it(plain_generator):
    """`claim` lends the model to one owner (an engine): meanwhile the generator refuses to
    generate and another owner cannot claim it; only that owner's `release` gives it back."""
    owner, other = object(), object()
    stream = plain_generator.generate_stream("Hello.", 0, [], max_audio_length_ms=240, seed=0)
    next(stream)
    plain_generator.claim(owner)
    with pytest.raises(RuntimeError, match="another generation started"):
        next(stream)
    with pytest.raises(RuntimeError, match="owned by an Engine"):
        plain_generator.generate("Hi.", 0, [], max_audio_length_ms=80)
    with pytest.raises(RuntimeError, match="owned by an Engine"):
        plain_generator.claim(other)
    plain_generator.release(other)  # not its owner: nothing happens
    with pytest.raises(RuntimeError, match="owned by an Engine"):
        plain_generator.generate_batch(["Hi."], [0], [[]], max_audio_length_ms=80)
    plain_generator.model.setup_caches(2)  # the owner's to set up
    plain_generator.release(owner)
    assert plain_generator.model.cache_rows == 1
    assert plain_generator.generate("Hi.", 0, [], max_audio_length_ms=80, seed=0).numel() == FRAME


def test_prompt_positions_follow_the_reference(plain_generator, mimi):
    tokenizer = plain_generator._tokenizer
    first_audio, second_audio = speech_like(0.2, seed=1), speech_like(0.1, seed=2)
    context = [Segment(0, "Hi there.", first_audio), Segment(1, "Yes?", second_audio)]
    prompt = plain_generator.prompt("Go on.", 0, context)
    tokens, mask = prompt.tokens, prompt.mask

    position = 0
    for segment in context:
        ids = tokenizer.encode(f"[{segment.speaker}]{segment.text}").ids
        span = slice(position, position + len(ids))
        assert tokens[span, 32].tolist() == ids
        assert not tokens[span, :32].any()
        assert mask[span, 32].all() and not mask[span, :32].any()
        position += len(ids)
        codes = mimi.encode(segment.audio[None, None])[0]
        frames = codes.shape[1]
        assert frames == -(-segment.audio.numel() // FRAME)
        assert torch.equal(tokens[position : position + frames, :32], codes.T)
        assert not tokens[position : position + frames + 1, 32].any()
        assert not tokens[position + frames, :32].any()  # the end-of-audio frame
        assert mask[position : position + frames + 1, :32].all()
        assert not mask[position : position + frames + 1, 32].any()
        position += frames + 1
    ids = tokenizer.encode("[0]Go on.").ids
    assert tokens[position:, 32].tolist() == ids
    assert tokens.shape[0] == position + len(ids) == plain_generator.prompt_length("Go on.", 0, context)
    assert ids[0] == tokenizer.token_to_id("<|begin_of_text|>") and ids[-1] == tokenizer.token_to_id("<|end_of_text|>")


def test_context_audio_is_encoded_once_by_content(plain_generator, mimi, monkeypatch):
    encode = mimi.encode
    calls = []
    monkeypatch.setattr(mimi, "encode", lambda wav: calls.append(wav.shape) or encode(wav))
    history = [Segment(0, "One.", speech_like(0.2, seed=1))]
    plain_generator.generate("Two.", 1, history, max_audio_length_ms=80, seed=0)
    history.append(Segment(1, "Two.", speech_like(0.2, seed=2)))
    # A copy of the first clip (another tensor, same samples) is found in the cache too.
    history[0] = Segment(0, "One.", history[0].audio.clone())
    plain_generator.generate("Three.", 0, history, max_audio_length_ms=80, seed=0)
    assert len(calls) == 2


def test_too_long_a_context_says_by_how_much(plain_generator):
    context = [Segment(0, "Long.", torch.zeros(75 * 24_000))]
    length = plain_generator.prompt_length("Hi.", 0, context)
    budget = 2048 - 1125 - 1
    with pytest.raises(
        ValueError, match=rf"takes {length} positions.*shorten the context by {length - budget} positions"
    ):
        plain_generator.generate("Hi.", 0, context)
    assert len(text_frames(plain_generator._tokenizer, "Hi.", 0)[0]) < length


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(text=""), "text must be a non-empty string"),
        (dict(text="   "), "text must be a non-empty string"),
        (dict(speaker=-1), "speaker must be a non-negative integer"),
        (dict(speaker="1"), "speaker must be a non-negative integer"),
        (dict(speaker=1.0), "speaker must be a non-negative integer"),
        (dict(max_audio_length_ms=0), "max_audio_length_ms must be at least 80"),
        (dict(max_audio_length_ms=-1000), "max_audio_length_ms must be at least 80"),
        (dict(temperature=0), "temperature must be a number from 0.01 to 5.0"),
        (dict(temperature=1e-40), "temperature must be a number from 0.01 to 5.0"),
        (dict(temperature=float("nan")), "temperature must be a number from 0.01 to 5.0"),
        (dict(temperature=50.0), "temperature must be a number from 0.01 to 5.0"),
        (dict(topk=0), "topk must be a positive integer"),
        (dict(context=[Segment(0, "x", torch.tensor([0.0, float("nan")]))]), r"context\[0\].audio contains NaN"),
        (dict(context=[Segment(0, "x", torch.zeros(2, 100))]), r"context\[0\].audio must be 1-D"),
        (dict(context=[Segment(0, "x", torch.zeros(0))]), r"context\[0\].audio is empty"),
        (dict(context=[Segment(-2, "x", torch.zeros(10))]), r"context\[0\].speaker must be"),
        (dict(context=[("not", "a segment")]), r"context\[0\] must be a Segment"),
    ],
)
def test_bad_arguments_are_named(plain_generator, arguments, message):
    call = dict(text="Hello.", speaker=0, context=[], max_audio_length_ms=160) | arguments
    with pytest.raises(ValueError, match=message):
        plain_generator.generate(**call)
    with pytest.raises(ValueError, match=message):
        plain_generator.generate_stream(**call)


def test_load_csm_1b_runs_offline_from_local_files(assets):
    generator = load_csm_1b(
        "cpu", dtype=torch.float32, model=str(assets.model), mimi=str(assets.mimi), watermarker=str(assets.watermarker)
    )
    assert generator.sample_rate == 24_000 and generator.device == torch.device("cpu")
    assert generator.generate("Hello.", 0, [], max_audio_length_ms=160, seed=0).shape == (2 * FRAME,)


def test_load_csm_1b_names_what_is_wrong(assets, tmp_path):
    with pytest.raises(ValueError, match="watermark key"):
        load_csm_1b("cpu", model=str(assets.model), watermark=[1, 2, 3])
    with pytest.raises(WeightsNotFoundError, match="neither an existing file or folder"):
        load_csm_1b("cpu", model=str(tmp_path / "nowhere"), mimi=str(assets.mimi), watermark=False)
