"""What one request's row does among others: it waits for a slow reader, fails alone, and its
audio does not depend on its neighbours."""

import logging
import threading
import time

import pytest
import torch

from csm import Generator, Segment, batching
from csm.engine import ClientTimeoutError, Engine, GenerationError, Request
from csm.engine.runner import Runner
from tests.product.conftest import speech_like
from tests.product.engine_parts import alone, assert_same_audio, joined, tiny_mimi

VOICE = Segment(1, "A voice to speak in.", speech_like(0.4, seed=11))
FRAME = 1920


@pytest.fixture(scope="module")
def codec():
    return tiny_mimi()


@pytest.fixture
def generator(parts, codec) -> Generator:
    model, tokenizer = parts
    return Generator(model, codec, tokenizer)


def test_a_slow_reader_holds_its_row_back_and_the_others_go_on(parts, codec, monkeypatch):
    model, tokenizer = parts
    slow_request = Request("Hello there.", 0, (), 15 * 80, seed=1)
    fast_request = Request("A longer line of words, after a voice.", 1, (VOICE,), 12 * 80, seed=2)
    later_request = Request("Short and late.", 0, (VOICE,), 10 * 80, seed=3)
    reference = Generator(model, codec, tokenizer, prefix_cache_bytes=0)
    expected = [alone(reference, request) for request in (slow_request, fast_request, later_request)]

    # 0.3 s is 3.75 frames: a row stops after its reader left 4 frames unread, and goes on once
    # it is down to 1 (half the bound).
    with Engine(Generator(model, codec, tokenizer), max_batch=2, max_ahead_s=0.3, client_timeout_s=120) as engine:
        slow = engine.submit(slow_request)
        fast = engine.submit(fast_request)
        fast_audio = joined(fast)  # while the slow request's reader reads nothing
        stats = engine.stats()
        assert stats["waiting_for_readers"] == 1 and stats["active"] == 1
        assert stats["frames_generated"] == 12 + 4
        # The slow one comes back while another prompt is being prefilled (held there until
        # then), so that prompt's row makes way for it.
        gate = threading.Event()
        feed = batching.CacheRows.feed

        def held_feed(batch, sequence):
            if sequence.sampling.max_frames == 10 and not gate.is_set():
                return None  # not all in yet
            return feed(batch, sequence)

        monkeypatch.setattr(batching.CacheRows, "feed", held_feed)
        later = engine.submit(later_request)
        deadline = time.monotonic() + 60
        while engine.stats()["active"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        slow_audio = joined(slow)
        gate.set()
        later_audio = [joined(later)]
        stats = engine.stats()
    assert_same_audio(fast_audio, expected[1])
    assert_same_audio(slow_audio, expected[0])
    assert_same_audio(torch.cat(later_audio), expected[2])
    assert stats["requests_finished"] == 3 and stats["waiting_for_readers"] == 0


def test_a_reader_that_stops_reading_is_cancelled_after_the_timeout(generator, caplog):
    with caplog.at_level(logging.WARNING, logger="csm.engine"):
        with Engine(generator, max_batch=1, max_ahead_s=0.1, client_timeout_s=1.0) as engine:
            stalled = engine.submit(Request("Hello there.", 0, max_audio_length_ms=10_000, seed=1))
            follower = engine.submit(Request("Next.", 0, max_audio_length_ms=160, seed=2))
            started = time.monotonic()
            assert joined(follower).numel() == 2 * FRAME  # it gets the row once the stalled one is gone
            waited = time.monotonic() - started
            chunks = []
            with pytest.raises(ClientTimeoutError, match="did not catch up within 1 s"):
                chunks.extend(stalled)
            stats = engine.stats()
    assert waited >= 1.0
    assert len(chunks) == 2  # 0.1 s is 1.25 frames: it stopped after 2 unread frames
    assert stats["requests_timed_out"] == 1 and stats["requests_cancelled"] == 0
    assert stats["requests_finished"] == 1 and stats["active"] == 0
    assert any("ahead of its reader" in record.getMessage() for record in caplog.records)


def test_non_finite_logits_fail_that_request_only(parts, codec):
    """A text token whose embedding is NaN spoils the one request that says it: its row's
    state and so its logits go NaN, which would sample the all-zero frame (silent end)."""
    model, tokenizer = parts
    good = [Request("Hello there.", 0, (), 400, seed=1), Request("Next line.", 1, (VOICE,), 320, seed=2)]
    bad = Request("Quixotic jazz.", 0, (), 400, seed=3)
    reference = Generator(model, codec, tokenizer, prefix_cache_bytes=0)
    expected = [alone(reference, request) for request in good]
    said = {id_ for request in good for id_ in tokenizer.encode(f"[{request.speaker}]{request.text}").ids}
    token = max(set(tokenizer.encode(f"[0]{bad.text}").ids) - said - {0})
    weight = model.text_embeddings.weight
    kept = weight[token].clone()
    with torch.no_grad():
        weight[token] = float("nan")
    try:
        with Engine(Generator(model, codec, tokenizer), max_batch=3) as engine:
            handles = [engine.submit(good[0]), engine.submit(bad), engine.submit(good[1])]
            with pytest.raises(GenerationError, match="non-finite logits"):
                joined(handles[1])
            audio = [joined(handles[0]), joined(handles[2])]
            stats = engine.stats()
        with pytest.raises(GenerationError, match="non-finite logits"):
            reference.generate(bad.text, bad.speaker, [], 400, seed=3)
    finally:
        with torch.no_grad():
            weight[token] = kept
    for actual, wanted in zip(audio, expected):
        assert_same_audio(actual, wanted)
    assert stats["requests_failed"] == 1 and stats["requests_finished"] == 2


def test_logits_that_go_non_finite_only_in_the_depth_decoder_fail_too(parts, codec):
    """A codebook head that overflows leaves the backbone state finite: the frame's other
    codebooks are checked as well, in generate and in the engine."""
    model, tokenizer = parts
    head = model.audio_head
    kept = head[6].clone()
    with torch.no_grad():
        head[6, :, 100] = float("inf")
    try:
        generator = Generator(model, codec, tokenizer, prefix_cache_bytes=0)
        with pytest.raises(GenerationError, match="non-finite logits at frame 1 of this request"):
            generator.generate("Hello there.", 0, [], 400, seed=1)
        with Engine(Generator(model, codec, tokenizer), max_batch=2) as engine:
            with pytest.raises(GenerationError, match="non-finite logits"):
                joined(engine.submit(Request("Hello there.", 0, (), 400, seed=1)))
            stats = engine.stats()
    finally:
        with torch.no_grad():
            head[6] = kept
    assert stats["requests_failed"] == 1 and stats["active"] == 0


def test_a_seed_gives_the_same_codes_beside_others_and_the_audio_within_float_rounding(parts, codec, monkeypatch):
    """Alone in a one-row engine, or in row 2 of four beside other requests: the same frames.
    Mimi's batched step rounds differently with the number of rows it steps, so the samples
    may differ by float rounding (measured: under 1e-6, below one 16-bit step of 3e-5)."""
    model, tokenizer = parts
    request = Request("A longer line of words, after a voice.", 1, (VOICE,), 8 * 80, seed=5)
    neighbours = [Request(f"Line {i}.", i % 2, (), 6 * 80, seed=10 + i) for i in range(3)]
    frames: dict[int, list[torch.Tensor]] = {}
    speak = Runner._speak

    def speak_and_record(runner, made):
        for running, frame in made:
            if running.stream.request is request:
                frames.setdefault(runner.scheduler.max_batch, []).append(frame.clone())
        speak(runner, made)

    monkeypatch.setattr(Runner, "_speak", speak_and_record)
    with Engine(Generator(model, codec, tokenizer), max_batch=1) as engine:
        lone = joined(engine.submit(request))
    with Engine(Generator(model, codec, tokenizer), max_batch=4) as engine:
        others = [engine.submit(neighbour) for neighbour in neighbours]
        next(others[0])
        beside = joined(engine.submit(request))
        for handle in others:
            list(handle)
    assert len(frames[1]) == 8 and torch.equal(torch.stack(frames[1]), torch.stack(frames[4]))
    assert_same_audio(beside, lone)
