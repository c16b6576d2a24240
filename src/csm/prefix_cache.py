"""The backbone's KV state of prompt prefixes, kept by the prefixes' content within a byte budget.

A voice is context that many requests share: a built-in prompt, or an uploaded clip with its
transcript; a conversation shares its earlier turns with its next request. Prefilling those
positions costs as much as everything else before the first frame, so the backbone's keys and
values of each context prefix are kept here, keyed by the prefix's tokens, and copied into a
cache row instead of being recomputed. The least recently used entries go first when the total
size would exceed the budget.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class PrefixKVCache:
    """KV states of prompt prefixes by content key, at most `max_bytes` in all, least recently used out."""

    def __init__(self, max_bytes: int):
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative integer, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0  # `get`s that found a state
        self._states: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, key: str) -> bool:
        return key in self._states

    def get(self, key: str) -> torch.Tensor | None:
        """The state kept under `key` (now the most recently used), or None."""
        with self._lock:
            state = self._states.get(key)
            if state is not None:
                self._states.move_to_end(key)
                self.hits += 1
            return state

    def put(self, key: str, state: torch.Tensor) -> None:
        """Keep `state` under `key`, dropping the least recently used states to stay in budget.

        A state larger than the whole budget is not kept.
        """
        size = _size(state)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._states:
                self.nbytes -= _size(self._states.pop(key))
            self._states[key] = state
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, dropped = self._states.popitem(last=False)
                self.nbytes -= _size(dropped)

    def clear(self) -> None:
        with self._lock:
            self._states.clear()
            self.nbytes = 0


def _size(state: torch.Tensor) -> int:
    return state.numel() * state.element_size()
