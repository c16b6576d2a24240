"""Work on threads that end with it: results, exceptions, and the thread it ran on."""

import asyncio
import threading

import pytest

from csm.threads import run_in_fresh_thread, to_fresh_thread


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
    assert threading.main_thread() not in (first, second)
