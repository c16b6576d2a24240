"""The engine's front door: admissions, submission that never blocks, `checked`, worker death."""

import asyncio
import threading
import time

import pytest
import torch

from csm import Generator, Segment, batching
from csm.engine import (
    Engine,
    EngineClosedError,
    EngineFailedError,
    QueueFullError,
    Request,
)
from tests.product.conftest import speech_like
from tests.product.engine_parts import tiny_mimi

LONG = Request("Hello there.", 0, max_audio_length_ms=10_000, seed=1)
SHORT = Request("Next.", 0, max_audio_length_ms=160, seed=2)


@pytest.fixture(scope="module")
def codec():
    return tiny_mimi()


@pytest.fixture
def generator(parts, codec) -> Generator:
    model, tokenizer = parts
    return Generator(model, codec, tokenizer)


def test_an_admission_holds_one_place_for_utterances_one_after_another(generator):
    with Engine(generator, max_batch=1, max_queue=0) as engine:
        admission = engine.reserve()
        with pytest.raises(QueueFullError):
            engine.reserve()
        with pytest.raises(QueueFullError):
            engine.submit(SHORT)
        # Its utterances never meet a full engine, however many there are.
        for _ in range(3):
            assert torch.cat(list(engine.submit(SHORT, admission))).numel() == 2 * 1920
        admission.release()
        admission.release()  # again: nothing happens
        with pytest.raises(RuntimeError, match="released"):
            engine.submit(SHORT, admission)
        with engine.reserve():  # the place is back, and leaving the block gives it back again
            pass
        assert torch.cat(list(engine.submit(SHORT))).numel() == 2 * 1920
        stats = engine.stats()
    assert stats["requests_rejected"] == 2 and stats["requests_finished"] == 4
    with pytest.raises(EngineClosedError):
        engine.reserve()


def test_submit_returns_at_once_and_checked_says_when_the_prompt_is_made(generator, monkeypatch):
    """Checking the audio and encoding context audio run on a thread that is neither the
    caller's nor the worker's; `checked` waits for them, and raises a bad request's error."""
    release = threading.Event()
    threads = []
    encode = generator._context_codes._encode

    def slow_encode(audio):
        threads.append(threading.current_thread())
        release.wait(60)
        return encode(audio)

    monkeypatch.setattr(generator._context_codes, "_encode", slow_encode)
    spoiled = speech_like(0.3, seed=13)
    spoiled[100] = float("nan")
    voice = Segment(1, "A voice to speak in.", speech_like(0.4, seed=11))

    async def scenario(engine):
        started = time.monotonic()
        handle = engine.submit(Request("Hello there.", 0, (voice,), 160, seed=1))
        assert time.monotonic() - started < 1.0  # the encoding waits on `release`
        check = asyncio.ensure_future(handle.checked())
        await asyncio.sleep(0.2)
        assert not check.done()
        release.set()
        await asyncio.wait_for(check, 60)
        audio = torch.cat([chunk async for chunk in handle])
        bad = engine.submit(Request("Broken.", 0, (Segment(1, "Spoiled.", spoiled),), 160, seed=3))
        with pytest.raises(ValueError, match="NaN"):
            await asyncio.wait_for(bad.checked(), 60)
        too_long = engine.submit(Request("Hi.", 0, (voice,), max_audio_length_ms=163_000))
        with pytest.raises(ValueError, match="context too long"):
            await asyncio.wait_for(too_long.checked(), 60)
        return audio

    with Engine(generator, max_batch=2) as engine:
        audio = asyncio.run(scenario(engine))
        # Arguments need no torch work: they are checked at once.
        with pytest.raises(ValueError, match="topk must be a positive integer"):
            engine.submit(Request("Hi.", topk=0))
        stats = engine.stats()
    assert audio.numel() == 2 * 1920
    assert stats["requests_failed"] == 2 and stats["requests_finished"] == 1
    assert threads and all(thread.name == "csm-engine-prepare" for thread in threads)


class Boom(BaseException):
    """Not an Exception: nothing in a turn catches it, so the worker dies of it."""


def test_a_dead_worker_fails_every_waiting_running_and_later_request_at_once(generator, monkeypatch):
    engine = Engine(generator, max_batch=1, max_queue=2)
    running = engine.submit(LONG)
    next(running)
    admission = engine.reserve()
    waiting = engine.submit(SHORT)
    outcomes = {}

    def read(name, handle):
        try:
            list(handle)
            outcomes[name] = None
        except BaseException as error:  # noqa: BLE001 -- what each reader heard is the test
            outcomes[name] = error

    readers = [threading.Thread(target=read, args=item) for item in (("running", running), ("waiting", waiting))]
    for reader in readers:
        reader.start()
    time.sleep(0.2)

    def explode(batch, sequences):
        raise Boom("the device is gone")

    monkeypatch.setattr(batching.CacheRows, "advance", explode)
    for reader in readers:
        reader.join(timeout=60)
    assert not any(reader.is_alive() for reader in readers), "a reader still waits"
    assert isinstance(engine.failure, Boom)
    for name in ("running", "waiting"):
        assert isinstance(outcomes[name], EngineFailedError), outcomes[name]
        assert "Boom: the device is gone" in str(outcomes[name])
    for later in (engine.reserve, lambda: engine.submit(SHORT), lambda: engine.submit(SHORT, admission)):
        with pytest.raises(EngineFailedError, match="the device is gone"):
            later()
    monkeypatch.undo()
    engine.close()
    assert generator.generate("Hi.", 0, [], max_audio_length_ms=80, seed=0).numel() == 1920


def test_a_failing_turn_fails_its_rows_and_the_engine_serves_on(generator, monkeypatch):
    advance = batching.CacheRows.advance
    calls = []

    def fail_once(batch, sequences):
        calls.append(len(sequences))
        if len(calls) == 2:
            raise RuntimeError("out of memory, once")
        return advance(batch, sequences)

    monkeypatch.setattr(batching.CacheRows, "advance", fail_once)
    with Engine(generator, max_batch=1) as engine:
        with pytest.raises(RuntimeError, match="once"):
            list(engine.submit(LONG))
        assert torch.cat(list(engine.submit(SHORT))).numel() == 2 * 1920
        assert engine.failure is None
        assert engine.stats()["requests_failed"] == 1


def test_a_reader_whose_event_loop_closed_does_not_hurt_the_engine(generator):
    """A chunk that arrives for a waiter on a closed loop: `call_soon_threadsafe` raises there
    (checking `is_closed` first races with the loop closing), and the worker must not die of it."""
    with Engine(generator, max_batch=2) as engine:
        handle = engine.submit(LONG)
        loop = asyncio.new_event_loop()

        async def give_up_waiting():
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(handle.__anext__(), 0.001)

        loop.run_until_complete(give_up_waiting())
        loop.close()  # its waiter is still registered with the stream
        next(handle)  # the worker's notification reached the closed loop
        assert torch.cat(list(engine.submit(SHORT))).numel() == 2 * 1920
        handle.cancel()
        assert engine.failure is None
