"""Generator.generate_batch: many utterances together, each what `generate` gives it alone."""

import pytest
import torch

import csm.generator
from csm import Generator, Segment
from tests.product.conftest import speech_like
from tests.product.engine_parts import tiny_mimi

VOICE = Segment(1, "A voice to speak in.", speech_like(0.4, seed=11))


@pytest.fixture(scope="module")
def codec():
    return tiny_mimi()


@pytest.fixture
def generator(parts, codec) -> Generator:
    model, tokenizer = parts
    return Generator(model, codec, tokenizer)


@pytest.mark.parametrize("temperature, topk", [(1.0, 1), (0.9, 50)])
def test_each_entry_is_what_generate_gives_alone(generator, monkeypatch, temperature, topk):
    # Two rows for three entries: the third takes the row of the first to finish.
    monkeypatch.setattr(csm.generator, "BATCH_ROWS", 2)
    texts = ["Hello there.", "A longer line of words, after a voice.", "Short."]
    speakers, contexts, seeds = [0, 1, 0], [[], [VOICE], [VOICE]], [1, 2, 3]
    batch = generator.generate_batch(texts, speakers, contexts, 320, temperature, topk, seeds=seeds)
    assert generator.model.cache_rows == 1
    for i, audio in enumerate(batch):
        expected = generator.generate(texts[i], speakers[i], contexts[i], 320, temperature, topk, seed=seeds[i])
        assert audio.dtype == torch.float32 and audio.shape == (4 * 1920,)
        assert torch.equal(audio, expected)


def test_batched_clips_are_watermarked_like_generate(parts, codec, watermarker):
    model, tokenizer = parts
    marked = Generator(model, codec, tokenizer, watermarker)
    [audio] = marked.generate_batch(["Hello there."], [0], [[]], 480, seeds=[5])
    assert torch.equal(audio, marked.generate("Hello there.", 0, [], 480, seed=5))


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"texts": ["Hi.", ""]}, r"entry 1: text must be a non-empty string"),
        ({"speakers": [0, -1]}, r"entry 1: speaker must be a non-negative integer"),
        ({"contexts": [[Segment(0, "x", torch.zeros(0))], []]}, r"entry 0: context\[0\].audio is empty"),
        ({"seeds": [1, 2.5]}, r"entry 1: seed must be an integer"),
        ({"speakers": [0]}, "one entry each per utterance"),
        ({"texts": "Hi."}, "texts must be a list"),
        ({"texts": [], "speakers": [], "contexts": []}, "texts is empty"),
    ],
)
def test_a_bad_entry_is_named_before_any_work(generator, arguments, message):
    call = {"texts": ["Hi.", "There."], "speakers": [0, 1], "contexts": [[], []]} | arguments
    with pytest.raises(ValueError, match=message):
        generator.generate_batch(**call, max_audio_length_ms=160)
    assert generator.model.cache_rows == 1
