"""Torch work on threads that end with it, so that one thread at a time owns OpenMP workers.

The CPU kernels' OpenMP workers belong to the thread that starts a parallel region, and
stay while that thread lives. Once more workers exist than cores, GNU OpenMP shortens how
long idle workers spin before they sleep, so every parallel region of every thread pays to
wake them. That hits the thousands of small operations of a frame: on a 2-core CPU the
engine's frames took 0.61 s with the model loaded on the main thread and 0.50 s with it
loaded on a thread that had ended. Loading, and torch work beside a busy engine thread,
run here instead; a long-lived thread that must do some torch work of its own beside an
engine (a server's event loop) can be made serial instead.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def run_in_fresh_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(*args, **kwargs)` on a new thread that ends with it: its result, or its exception."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = fn(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 -- re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name=f"csm-{getattr(fn, '__name__', 'work')}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


async def to_fresh_thread(fn: Callable[..., T], *args) -> T:
    """`asyncio.to_thread`, with the work on a new thread that ends with the call: the pooled
    thread only waits for it, so it never keeps OpenMP workers of its own."""
    return await asyncio.to_thread(run_in_fresh_thread, fn, *args)


class SerialQueue:
    """Runs calls one after another on a thread that ends once none are left.

    For work that must neither block its caller nor run on a long-lived thread: each call
    returns at once, at most one thread of the queue runs at a time (so its torch work never
    competes with itself), and that thread ends when the queue is empty, taking its OpenMP
    workers with it. A call's exception is logged; calls handle their own errors.
    """

    def __init__(self, name: str):
        self.name = name
        self._calls: deque[tuple[Callable[..., object], tuple]] = deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[..., object], *args) -> None:
        with self._lock:
            self._calls.append((fn, args))
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, name=self.name, daemon=True)
                self._thread.start()

    def join(self) -> None:
        """Wait until every call submitted so far has run (from another thread than the queue's)."""
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._calls:
                    self._thread = None
                    return
                fn, args = self._calls.popleft()
            try:
                fn(*args)
            except BaseException:  # noqa: BLE001 -- the queue goes on with the next call
                logging.getLogger("csm.threads").exception("%s: a call failed", self.name)


def make_this_thread_serial() -> None:
    """Run the calling thread's torch work on one core from now on, so that it never starts
    OpenMP workers; other threads, and threads started later, keep the process's thread count.

    PyTorch's OpenMP thread count is per thread once a thread has used it: `set_num_threads`
    sets the calling thread's and the default that new threads start from, so the default is
    set back from a thread of its own. (Where the CPU backend is not OpenMP the count is one
    for the process: it is then simply set back.)
    """
    threads = torch.get_num_threads()  # first: this thread takes the default now, not later over the 1
    torch.set_num_threads(1)
    run_in_fresh_thread(torch.set_num_threads, threads)
