"""The 5-byte message as a string of symbols, and reading it back from per-frame guesses.

A key of 5 bytes is 40 bits, read MSB first as 20 two-bit values; value v becomes symbol
v + 1 and a 21st symbol 0 marks the end. The embedder repeats these 21 symbols along the
frames from frame 0. The detector guesses one symbol per frame, lays the guesses out in
rows of 21, takes each column's most frequent symbol, and rotates the result so that it
starts right after the end marker: the clip need not start at a message boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from csm.watermark.networks import SYMBOL_KINDS

CSM_KEY = (212, 211, 146, 56, 201)  # the public key CSM marks every clip with
KEY_BYTES = 5
MESSAGE_SYMBOLS = 4 * KEY_BYTES + 1  # 21: two-bit symbols plus the end marker
END_MARKER = 0


@dataclass(frozen=True)
class DecodedMessage:
    message: list[int]  # 5 bytes as ints (see `read_message` for the original's quirks)
    confidence: float  # fraction of frames that agree with their column's symbol


def check_key(key: Sequence[int]) -> tuple[int, ...]:
    """`key` (a list, tuple or bytes) as a tuple of 5 ints in 0..255; a ValueError otherwise."""
    values = tuple(key) if isinstance(key, (list, tuple, bytes)) else None
    if values is None or len(values) != KEY_BYTES:
        raise ValueError(f"a watermark key is a list of {KEY_BYTES} integers in 0..255, got {key!r}")
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= 255 for v in values):
        raise ValueError(f"a watermark key is a list of {KEY_BYTES} integers in 0..255, got {key!r}")
    return tuple(int(v) for v in values)


def key_symbols(key: Sequence[int]) -> list[int]:
    """The 21 symbols embedded for `key`: its 20 two-bit values + 1, then the end marker."""
    bits = "".join(f"{byte:08b}" for byte in check_key(key))
    return [int(bits[i : i + 2], 2) + 1 for i in range(0, len(bits), 2)] + [END_MARKER]


def one_hot_message(symbols: Sequence[int], frames: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(5, frames) float32: the symbols one-hot, repeated from frame 0 and cut to `frames`."""
    repeats = -(-frames // len(symbols))
    indices = torch.tensor(list(symbols) * repeats, device=device)[:frames]
    return torch.nn.functional.one_hot(indices, SYMBOL_KINDS).T.float()


def symbol_grid(guesses: np.ndarray) -> np.ndarray:
    """Per-frame symbol guesses (T,) as rows of 21 (T // 21, 21); trailing frames dropped."""
    rows = len(guesses) // MESSAGE_SYMBOLS
    return guesses[: rows * MESSAGE_SYMBOLS].reshape(rows, MESSAGE_SYMBOLS)


def column_counts(grid: np.ndarray) -> np.ndarray:
    """(5, 21): how often each symbol occurs in each column."""
    return np.stack([(grid == symbol).sum(axis=0) for symbol in range(SYMBOL_KINDS)])


def consistency_score(grid: np.ndarray) -> float:
    """Mean over columns of the share of rows that agree with the column's majority.

    Summed column by column in float64 like the original, so that equal scores compare
    equal in the phase-shift search exactly as they do there.
    """
    rows = grid.shape[0]
    total = 0.0
    for count in column_counts(grid).max(axis=0):
        total += count / rows
    return total / MESSAGE_SYMBOLS


def read_message(grid: np.ndarray) -> DecodedMessage | None:
    """The message in a symbol grid, or None where the original finds none.

    Each column's symbol is its most frequent guess (ties go to the smaller symbol). None
    when the grid is empty or no column reads as the end marker. After rotation, any
    further end marker reads as the value -1; the original turns values into bytes through
    their binary text, where that makes a byte fail to parse (None) or, when it opens a
    byte, read as a negative number. We keep those quirks so that results stay equal.
    """
    if grid.shape[0] == 0:
        return None
    counts = column_counts(grid)
    symbols = counts.argmax(axis=0)
    markers = np.flatnonzero(symbols == END_MARKER)
    if markers.size == 0:
        return None
    confidence = float(np.mean((grid == symbols[None]).astype(np.float32)))
    end = markers[0]
    rotated = np.concatenate([symbols[end + 1 :], symbols[:end]])
    text = "".join(f"{value - 1:02b}" for value in rotated.tolist())
    try:
        message = [int(text[i : i + 8], 2) for i in range(0, len(text), 8)]
    except ValueError:
        return None
    return DecodedMessage(message, confidence)
