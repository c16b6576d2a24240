"""The message layout and the decoding rules, on hand-built symbol guesses."""

import numpy as np
import pytest
import torch

from csm.watermark import CSM_KEY
from csm.watermark.message import (
    check_key,
    consistency_score,
    key_symbols,
    one_hot_message,
    read_message,
    symbol_grid,
)

CSM_SYMBOLS = key_symbols(CSM_KEY)


def test_key_bytes_become_two_bit_symbols_msb_first_then_the_end_marker():
    assert key_symbols([0b11_01_00_10, 0, 255, 1, 64]) == [
        4,
        2,
        1,
        3,
        1,
        1,
        1,
        1,
        4,
        4,
        4,
        4,
        1,
        1,
        1,
        2,
        2,
        1,
        1,
        1,
        0,
    ]
    assert len(CSM_SYMBOLS) == 21 and CSM_SYMBOLS[-1] == 0 and 0 not in CSM_SYMBOLS[:-1]


def test_one_hot_message_repeats_from_frame_zero():
    message = one_hot_message([1, 2, 0], 7)
    assert message.shape == (5, 7) and message.dtype == torch.float32
    assert message.argmax(0).tolist() == [1, 2, 0, 1, 2, 0, 1]
    assert (message.sum(0) == 1).all()


@pytest.mark.parametrize(
    "key", [[1, 2, 3, 4], [1, 2, 3, 4, 256], [1, 2, 3, 4, -1], [1.0, 2, 3, 4, 5], "abcde", [True, 2, 3, 4, 5]]
)
def test_a_key_must_be_five_bytes(key):
    with pytest.raises(ValueError, match="5 integers in 0..255"):
        check_key(key)
    assert check_key(np.array([1, 2, 3, 4, 5]).tolist()) == (1, 2, 3, 4, 5)
    assert check_key(bytes([212, 211, 146, 56, 201])) == CSM_KEY


def test_the_grid_keeps_whole_rows_of_21():
    assert symbol_grid(np.arange(50)).shape == (2, 21)
    assert symbol_grid(np.arange(20)).shape == (0, 21)


def test_a_clean_repeated_message_reads_back_with_full_confidence():
    guesses = np.array(CSM_SYMBOLS * 3 + CSM_SYMBOLS[:5])
    decoded = read_message(symbol_grid(guesses))
    assert decoded.message == list(CSM_KEY) and decoded.confidence == 1.0
    assert consistency_score(symbol_grid(guesses)) == 1.0


def test_the_message_is_rotated_to_start_after_the_end_marker():
    # the clip starts 7 symbols into the message
    guesses = np.array((CSM_SYMBOLS * 4)[7 : 7 + 42])
    assert read_message(symbol_grid(guesses)).message == list(CSM_KEY)


def test_columns_take_their_majority_and_ties_go_to_the_smaller_symbol():
    assert CSM_SYMBOLS[:3] == [4, 2, 2]
    rows = np.array([CSM_SYMBOLS] * 4)
    rows[0, 0] = 1  # column 0: 4 wins 3 to 1
    rows[:2, 1] = 1  # column 1: 1 and 2 tie -> 1
    rows[:2, 2] = 3  # column 2: 2 and 3 tie -> 2
    decoded = read_message(rows)
    expected_bits = "".join(f"{s - 1:02b}" for s in [4, 1, 2] + CSM_SYMBOLS[3:20])
    assert decoded.message == [int(expected_bits[i : i + 8], 2) for i in range(0, 40, 8)]
    assert decoded.confidence == pytest.approx(1 - 5 / 84)  # five frames disagree with their column


def test_no_end_marker_means_no_message():
    rows = np.array([[1] * 21, [2] * 21])
    assert read_message(rows) is None
    assert read_message(np.zeros((0, 21), dtype=np.int64)) is None


def test_a_second_end_marker_follows_the_original_text_conversion():
    # The end marker in column 0, then the data; a further marker reads as the value -1,
    # written "-1" in the original's bit text.
    layout = [0] + CSM_SYMBOLS[:20]
    starts_a_byte = list(layout)
    starts_a_byte[1 + 4] = 0  # opens byte 1: "-1xxxxxx" parses as a negative number
    decoded = read_message(np.array([starts_a_byte]))
    bits = "".join(f"{s - 1:02b}" for s in CSM_SYMBOLS[5:8])
    assert decoded.message[1] == -int("1" + bits, 2)
    assert decoded.message[0] == CSM_KEY[0] and decoded.message[2:] == list(CSM_KEY[2:])
    inside_a_byte = list(layout)
    inside_a_byte[1 + 5] = 0  # a "-" inside a byte does not parse: no message
    assert read_message(np.array([inside_a_byte])) is None


def test_the_first_end_marker_wins():
    guesses = list(CSM_SYMBOLS)
    guesses[20], guesses[0] = CSM_SYMBOLS[0], 0  # the marker moved to column 0
    decoded = read_message(np.array([guesses]))
    assert decoded is not None and decoded.confidence == 1.0


def test_consistency_score_is_the_mean_majority_share_per_column():
    rows = np.array([CSM_SYMBOLS] * 3)
    rows[0, :7] = 0  # one row of three disagrees in 7 columns
    assert consistency_score(rows) == pytest.approx((14 * 1 + 7 * 2 / 3) / 21)
