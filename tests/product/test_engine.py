"""The continuous-batching engine on a tiny CSM and a tiny Mimi: each request as if alone."""

import asyncio
import gc
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from csm import Generator, Segment, batching
from csm.engine import Engine, EngineClosedError, QueueFullError, Request
from csm.errors import CSMError
from tests.product.conftest import speech_like
from tests.product.engine_parts import alone, assert_same_audio, joined, tiny_mimi

VOICE = Segment(1, "A voice to speak in.", speech_like(0.4, seed=11))
TURN = Segment(0, "Hello, how are you?", speech_like(0.2, seed=12))


@pytest.fixture(scope="module")
def codec():
    return tiny_mimi()


@pytest.fixture
def generator(parts, codec) -> Generator:
    model, tokenizer = parts
    return Generator(model, codec, tokenizer)


def counted(feed, positions: list[int]):
    """`Batch.feed` that also records how many prompt positions each call fed."""

    def feed_and_count(batch, sequence):
        start = sequence.prefilled
        state = feed(batch, sequence)
        positions.append(sequence.prefilled - start)
        return state

    return feed_and_count


@pytest.mark.parametrize("temperature, topk", [(1.0, 1), (0.9, 50)])
def test_rows_admitted_at_different_frames_give_what_generate_gives_alone(parts, codec, monkeypatch, temperature, topk):
    model, tokenizer = parts
    requests = [
        Request("Hello there.", 0, (), 400, temperature, topk, seed=1),
        Request("A longer line of words, to say after a voice.", 1, (VOICE,), 560, temperature, topk, seed=2),
        Request("Short.", 0, (VOICE, TURN), 240, temperature, topk, seed=3),
    ]
    reference = Generator(model, codec, tokenizer, prefix_cache_bytes=0)
    expected = [alone(reference, request) for request in requests]
    assert [len(audio) // 1920 for audio in expected] == [5, 7, 3]

    generator = Generator(model, codec, tokenizer)
    feeds = []
    monkeypatch.setattr(batching.CacheRows, "feed", counted(batching.CacheRows.feed, feeds))
    with Engine(generator, max_batch=2) as engine:
        first = engine.submit(requests[0])
        heard = [[next(first)], [], []]
        second = engine.submit(requests[1])  # joins while the first decodes
        heard[1].append(next(second))
        third = engine.submit(requests[2])  # waits for a row: it takes the first one's when that ends
        heard[0] += list(first)
        heard[1] += list(second)
        heard[2] += list(third)
        stats = engine.stats()
    for chunks, audio in zip(heard, expected):
        assert all(chunk.shape == (1920,) and chunk.dtype == torch.float32 for chunk in chunks)
        assert_same_audio(torch.cat(chunks), audio)
    assert stats["frames_generated"] == 15 and stats["requests_finished"] == 3
    assert stats["queue_length"] == 0 and stats["active"] == 0
    # The third request's voice prefix came from the cache that the second one filled: it was
    # not fed again.
    assert generator.prefix_cache.hits == 1
    voice_positions = generator.prompt(requests[2].text, requests[2].speaker, requests[2].context).prefixes[0][0]
    prompts = sum(generator.prompt_length(request.text, request.speaker, request.context) for request in requests)
    assert sum(feeds) == prompts - voice_positions


def test_threads_and_an_asyncio_loop_submit_at_once(generator, parts, codec):
    model, tokenizer = parts
    requests = [Request(f"Line number {i}.", i % 2, (VOICE,) if i % 3 == 0 else (), 240, seed=i) for i in range(6)]
    reference = Generator(model, codec, tokenizer, prefix_cache_bytes=0)
    expected = [alone(reference, request) for request in requests]

    async def collect(engine, request):
        return torch.cat([chunk async for chunk in engine.submit(request)])

    async def from_loop(engine):
        return await asyncio.gather(*(collect(engine, request) for request in requests[:3]))

    with Engine(generator, max_batch=4) as engine, ThreadPoolExecutor(3) as pool:
        threaded = [pool.submit(lambda r=request: joined(engine.submit(r))) for request in requests[3:]]
        looped = asyncio.run(from_loop(engine))
        results = [*looped, *(future.result() for future in threaded)]
    for audio, reference_audio in zip(results, expected):
        assert_same_audio(audio, reference_audio)


def test_cancel_frees_the_row_within_a_frame(generator):
    with Engine(generator, max_batch=1) as engine:
        talker = engine.submit(Request("Hello there.", 0, max_audio_length_ms=10_000, seed=1))
        next(talker)
        talker.cancel()
        before = engine.stats()["frames_generated"]
        after_cancel = list(talker)
        follower = engine.submit(Request("Next.", 0, max_audio_length_ms=160, seed=2))
        audio = joined(follower)
        stats = engine.stats()
    assert after_cancel == []
    assert audio.numel() == 2 * 1920
    assert stats["frames_generated"] - before - 2 <= 1
    assert stats["requests_cancelled"] == 1 and stats["requests_finished"] == 1


def test_a_consumer_that_goes_away_frees_its_row(generator):
    with Engine(generator, max_batch=1) as engine:
        talker = engine.submit(Request("Hello there.", 0, max_audio_length_ms=10_000, seed=1))
        next(talker)
        del talker
        gc.collect()
        follower = engine.submit(Request("Next.", 0, max_audio_length_ms=160, seed=2))
        assert joined(follower).numel() == 2 * 1920
        assert engine.stats()["requests_cancelled"] == 1


def test_a_full_queue_rejects_and_frees_up(generator):
    long = Request("Hello there.", 0, max_audio_length_ms=10_000, seed=1)
    with Engine(generator, max_batch=1, max_queue=1) as engine:
        running, waiting = engine.submit(long), engine.submit(long)
        with pytest.raises(QueueFullError, match="1 rows and 1 queue places taken") as error:
            engine.submit(long)
        assert isinstance(error.value, CSMError)
        waiting.cancel()
        running.cancel()
        assert joined(engine.submit(Request("Next.", 0, max_audio_length_ms=80, seed=2))).numel() == 1920
        assert engine.stats()["requests_rejected"] == 1


def test_a_failing_request_fails_alone(generator, parts, codec):
    model, tokenizer = parts
    good = Request("Still fine.", 0, (VOICE,), 240, seed=4)
    expected = alone(Generator(model, codec, tokenizer, prefix_cache_bytes=0), good)
    clip = speech_like(0.3, seed=13)
    clip[100] = float("nan")
    with Engine(generator, max_batch=1) as engine:
        blocker = engine.submit(Request("Hold the row.", 0, max_audio_length_ms=10_000, seed=1))
        next(blocker)
        bad = engine.submit(Request("Broken context.", 0, (Segment(1, "Spoiled.", clip),), 240, seed=3))
        after = engine.submit(good)
        blocker.cancel()
        with pytest.raises(ValueError, match="NaN"):
            joined(bad)
        assert_same_audio(joined(after), expected)
        stats = engine.stats()
    assert stats["requests_failed"] == 1 and stats["requests_finished"] == 1


def test_memory_stays_flat_over_a_thousand_requests(generator):
    def live_tensors() -> int:
        gc.collect()
        return sum(type(item) is torch.Tensor for item in gc.get_objects())

    def serve(count: int, worker: int) -> None:
        for i in range(count):
            context = (VOICE,) if i % 10 == 0 else ()
            audio = joined(engine.submit(Request(f"Line {i}.", worker % 2, context, 80, seed=i)))
            assert audio.numel() == 1920

    with Engine(generator, max_batch=4, max_queue=4) as engine:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(serve, [25] * 4, range(4)))
        warm = live_tensors()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(serve, [225] * 4, range(4)))
        stats = engine.stats()
        # Nothing grows with the 900 requests; a few tensors may be the worker's, still tidying
        # the last row when the last reader returns.
        assert live_tensors() <= warm + 8
    assert stats["requests_finished"] == 1000 and stats["active"] == 0 and stats["queue_length"] == 0
    assert generator.prefix_cache.nbytes <= generator.prefix_cache.max_bytes


def test_requests_are_checked_when_submitted(generator):
    with Engine(generator, max_batch=1) as engine:
        for request, message in [
            (Request(""), "text must be a non-empty string"),
            (Request("Hi.", speaker=-1), "speaker must be a non-negative integer"),
            (Request("Hi.", topk=0), "topk must be a positive integer"),
            (Request("Hi.", context=[Segment(0, "x", torch.zeros(0))]), r"context\[0\].audio is empty"),
            (Request("Hi.", seed="1"), "seed must be an integer"),
        ]:
            with pytest.raises(ValueError, match=message):
                engine.submit(request)
        with pytest.raises(ValueError, match="Request"):
            engine.submit("Hi.")
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1"):
        Engine(generator, max_batch=0)


def test_the_engine_owns_the_model_until_closed(generator):
    engine = Engine(generator, max_batch=2)
    with pytest.raises(RuntimeError, match="owned by an Engine"):
        generator.generate("Hi.", 0, [], max_audio_length_ms=80)
    waiting = [engine.submit(Request("Hello there.", 0, max_audio_length_ms=10_000)) for _ in range(3)]
    engine.close()
    for handle in waiting:
        with pytest.raises(EngineClosedError):
            list(handle)
    with pytest.raises(EngineClosedError):
        engine.submit(Request("Hi."))
    assert generator.model.cache_rows == 1
    assert generator.generate("Hi.", 0, [], max_audio_length_ms=80, seed=0).numel() == 1920


def test_making_a_generator_submitting_and_closing_leave_torch_work_off_the_callers_thread(parts, codec, monkeypatch):
    """Cache set-up and audio checks are parallel torch work: on the caller's thread they would
    leave that thread holding OpenMP workers, which slows the engine beside it (see csm.threads)."""
    model, tokenizer = parts
    threads = []
    setup_caches = model.setup_caches
    monkeypatch.setattr(
        model, "setup_caches", lambda rows: (threads.append(threading.current_thread()), setup_caches(rows))
    )
    generator = Generator(model, codec, tokenizer)
    check_request = generator.check_request
    monkeypatch.setattr(
        generator, "check_request", lambda *args: (threads.append(threading.current_thread()), check_request(*args))
    )
    with Engine(generator, max_batch=2) as engine:
        assert joined(engine.submit(Request("Hello there.", 0, (VOICE,), 160, seed=0))).numel() == 2 * 1920
    # The generator's one row, the engine's two (on its worker), the check of the request (with
    # context audio), one row again.
    assert len(threads) == 4
    assert threading.current_thread() not in threads
    assert model.cache_rows == 1


def test_streamed_chunks_are_plain_and_the_result_is_watermarked(parts, codec, watermarker):
    model, tokenizer = parts
    marked = Generator(model, codec, tokenizer, watermarker)
    request = Request("Hello there.", 0, (), 480, seed=5)
    plain = alone(Generator(model, codec, tokenizer), request)
    whole = marked.generate("Hello there.", 0, [], 480, seed=5)
    with Engine(marked, max_batch=2) as engine:
        streamed = joined(engine.submit(request))
        result = engine.submit(request).result()
    assert_same_audio(streamed, plain)
    torch.testing.assert_close(result, whole, rtol=0, atol=1e-4)
    assert not torch.allclose(result, streamed)


def test_handles_iterate_from_any_thread(generator):
    with Engine(generator, max_batch=2) as engine:
        handle = engine.submit(Request("Hello there.", 0, max_audio_length_ms=240, seed=1))
        chunks = []
        reader = threading.Thread(target=lambda: chunks.extend(handle))
        reader.start()
        reader.join(timeout=120)
    assert len(chunks) == 3
