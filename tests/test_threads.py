"""Work on threads that end with it: results, exceptions, and the thread it ran on."""

import asyncio
import threading

import pytest

from csm.threads import make_this_thread_serial, run_in_fresh_thread, to_fresh_thread


def ran_on() -> threading.Thread:
    return threading.current_thread()


def fail(message: str) -> None:
    raise KeyError(message)


def test_run_in_fresh_thread_returns_from_a_thread_that_has_ended():
    thread = run_in_fresh_thread(ran_on)
    assert thread is not threading.current_thread()
    assert not thread.is_alive()
    assert run_in_fresh_thread(divmod, 7, 2) == (3, 1)


def test_run_in_fresh_thread_raises_the_exception_of_the_work():
    with pytest.raises(KeyError, match="no such voice"):
        run_in_fresh_thread(fail, "no such voice")


def test_to_fresh_thread_awaits_a_new_thread_each_call():
    async def main():
        first, second = await asyncio.gather(to_fresh_thread(ran_on), to_fresh_thread(ran_on))
        with pytest.raises(KeyError, match="gone"):
            await to_fresh_thread(fail, "gone")
        return first, second

    first, second = asyncio.run(main())
    assert first is not second
    # Threads of their own that have ended, not the pool's threads, which live on.
    assert first.name == second.name == "csm-ran_on"
    assert not first.is_alive() and not second.is_alive()


def test_to_fresh_thread_cancelled_lets_its_work_end_quietly(monkeypatch):
    release, errors = threading.Event(), []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))

    def slow() -> str:
        release.wait(timeout=10)
        return "late"

    async def main():
        task = asyncio.create_task(to_fresh_thread(slow))
        await asyncio.sleep(0.05)
        [worker] = [thread for thread in threading.enumerate() if thread.name == "csm-slow"]
        task.cancel()
        release.set()
        return worker

    worker = asyncio.run(main())  # the loop closes once the cancelled call's work is done
    worker.join(timeout=10)
    assert not worker.is_alive() and errors == []


def test_make_this_thread_serial_leaves_other_threads_their_thread_count():
    import torch

    threads = torch.get_num_threads()

    def serial_here() -> tuple[int, int]:
        make_this_thread_serial()
        return torch.get_num_threads(), run_in_fresh_thread(torch.get_num_threads)

    assert run_in_fresh_thread(serial_here) == (1, threads)
    assert torch.get_num_threads() == threads
