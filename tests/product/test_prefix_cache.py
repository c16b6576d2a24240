"""Cached voice prompts: KV state of context prefixes, by content, within a byte budget."""

import pytest
import torch

from csm import Generator, Segment
from csm.prefix_cache import PrefixKVCache
from tests.product.conftest import speech_like
from tests.product.engine_parts import tiny_mimi

VOICE = Segment(1, "A voice to speak in.", speech_like(0.4, seed=11))
OTHER = Segment(0, "Another voice entirely.", speech_like(0.3, seed=14))
TURN = Segment(0, "Hello, how are you?", speech_like(0.2, seed=12))


@pytest.fixture(scope="module")
def codec():
    return tiny_mimi()


def state(kib: int) -> torch.Tensor:
    return torch.zeros(kib * 256)  # float32: 1 KiB per 256 entries


def test_least_recently_used_states_go_first_to_stay_in_budget():
    cache = PrefixKVCache(3 * 1024)
    cache.put("a", state(1))
    cache.put("b", state(1))
    cache.put("c", state(1))
    assert cache.get("a") is not None  # now the most recently used
    cache.put("d", state(2))
    assert "a" in cache and "d" in cache and "b" not in cache and "c" not in cache
    assert cache.nbytes == 3 * 1024
    cache.put("huge", state(4))  # larger than the whole budget: not kept, nothing dropped
    assert "huge" not in cache and len(cache) == 2
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixKVCache(-1)


def test_the_same_seed_gives_the_same_audio_with_and_without_the_cache(parts, codec):
    model, tokenizer = parts
    cached = Generator(model, codec, tokenizer)
    uncached = Generator(model, codec, tokenizer, prefix_cache_bytes=0)
    for _ in range(2):  # the second call starts from the cached voice
        for context in ([VOICE], [VOICE, TURN]):
            with_cache = cached.generate("Say this.", 0, context, 240, seed=3)
            without = uncached.generate("Say this.", 0, context, 240, seed=3)
            assert torch.equal(with_cache, without)
    assert len(cached.prefix_cache) == 2 and len(uncached.prefix_cache) == 0


def test_a_known_voice_and_the_turns_after_it_are_not_prefilled_again(parts, codec):
    model, tokenizer = parts
    generator = Generator(model, codec, tokenizer)
    sampling = generator.sampling(240, 0.9, 50, 1)
    fresh = generator.prompt("Say this.", 0, [VOICE, TURN])
    voice_length, conversation_length = (length for length, _ in fresh.prefixes)
    assert generator.model.cache_rows == 1
    assert generator._rows.start(fresh, sampling, 0).prefilled == 0

    generator.generate("First.", 0, [VOICE], 80, seed=0)
    assert generator._rows.start(fresh, sampling, 0).prefilled == voice_length
    generator.generate("Second.", 0, [VOICE, TURN], 80, seed=0)
    assert generator._rows.start(fresh, sampling, 0).prefilled == conversation_length
    other = generator.prompt("Say this.", 0, [OTHER, TURN])
    assert generator._rows.start(other, sampling, 0).prefilled == 0


def test_the_budget_evicts_voices_by_size(parts, codec):
    model, tokenizer = parts
    probe = Generator(model, codec, tokenizer)
    probe.generate("Hi.", 0, [VOICE], 80, seed=0)
    one_voice = probe.prefix_cache.nbytes
    generator = Generator(model, codec, tokenizer, prefix_cache_bytes=one_voice + one_voice // 2)
    generator.generate("Hi.", 0, [VOICE], 80, seed=0)
    generator.generate("Hi.", 0, [OTHER], 80, seed=0)
    [kept] = generator.prefix_cache._states
    assert kept == generator.prompt("Hi.", 0, [OTHER]).prefixes[0][1]
    assert generator.prefix_cache.nbytes <= generator.prefix_cache.max_bytes
