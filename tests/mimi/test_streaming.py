"""Streaming encode and decode give what the whole-signal calls give."""

from __future__ import annotations

import pytest
import torch


def split(tensor: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(tensor, sizes, dim=-1))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def codes():
    return torch.randint(0, 2048, (2, 32, 4), generator=torch.Generator().manual_seed(0))


def test_decode_frame_by_frame_equals_full_decode(mimi, codes):
    stream = mimi.decode_stream(batch_size=2)
    chunks = [stream.step(codes[..., t : t + 1]) for t in range(codes.shape[-1])]
    assert all(chunk.shape == (2, 1, 1920) for chunk in chunks)
    assert relative_error(torch.cat(chunks, dim=-1), mimi.decode(codes)) < 1e-5


def test_decode_chunks_of_several_frames_and_reset(mimi, codes):
    stream = mimi.decode_stream(batch_size=2)
    first = torch.cat([stream.step(chunk) for chunk in split(codes, [2, 1, 1])], dim=-1)
    stream.reset()
    again = torch.cat([stream.step(chunk) for chunk in split(codes, [1, 3])], dim=-1)
    full = mimi.decode(codes)
    assert relative_error(first, full) < 1e-5
    assert relative_error(again, full) < 1e-5


def test_encode_stream_equals_full_encode(mimi):
    wav = 0.1 * torch.randn(2, 1, 4 * 1920, generator=torch.Generator().manual_seed(1))
    stream = mimi.encode_stream(batch_size=2)
    streamed = torch.cat([stream.step(chunk) for chunk in split(wav, [1920, 2 * 1920, 1920])], dim=-1)
    assert torch.equal(streamed, mimi.encode(wav))
    stream.reset()
    assert torch.equal(stream.step(wav[..., :1920]), mimi.encode(wav[..., :1920]))


def test_streams_past_the_attention_window(tiny_reference_pair):
    # 126 frames = 252 steps at 25 Hz: the caches must drop what falls out of the window.
    _, tiny = tiny_reference_pair
    generator = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 2048, (1, 8, 126), generator=generator)
    decoder = tiny.decode_stream()
    streamed = torch.cat([decoder.step(chunk) for chunk in split(codes, [1] * 6 + [120])], dim=-1)
    assert relative_error(streamed, tiny.decode(codes)) < 1e-5

    wav = 0.1 * torch.randn(1, 1, 126 * 1920, generator=generator)
    encoder = tiny.encode_stream()
    streamed_codes = torch.cat([encoder.step(chunk) for chunk in split(wav, [1920] * 6 + [120 * 1920])], dim=-1)
    assert torch.equal(streamed_codes, tiny.encode(wav))


def test_stream_rejects_bad_chunks(mimi, codes):
    with pytest.raises(ValueError, match="multiples of 1920"):
        mimi.encode_stream().step(torch.zeros(1, 1, 1000))
    with pytest.raises(ValueError, match="batch size 1"):
        mimi.encode_stream().step(torch.zeros(2, 1, 1920))
    with pytest.raises(ValueError, match="batch size 1"):
        mimi.decode_stream().step(codes)
    with pytest.raises(ValueError, match="0..2047"):
        mimi.decode_stream().step(torch.full((1, 32, 1), 2048))


def stream_frames(stream, codes: torch.Tensor) -> torch.Tensor:
    return torch.cat([stream.step(codes[..., t : t + 1]) for t in range(codes.shape[-1])], dim=-1)


@pytest.mark.parametrize("rows", [[1], slice(0, 3, 2)], ids=["one-row", "slice"])
def test_reset_rows_starts_new_streams_there_only(mimi, rows):
    generator = torch.Generator().manual_seed(3)
    old = torch.randint(0, 2048, (3, 32, 5), generator=generator)
    new = torch.randint(0, 2048, (3, 32, 2), generator=generator)
    reset = list(range(3)[rows] if isinstance(rows, slice) else rows)
    kept = [row for row in range(3) if row not in reset]

    stream = mimi.decode_stream(batch_size=3)
    before = stream_frames(stream, old[..., :3])
    stream.reset(rows)
    after_codes = old[..., 3:].clone()
    after_codes[reset] = new[reset]
    after = stream_frames(stream, after_codes)

    uninterrupted = stream_frames(mimi.decode_stream(batch_size=3), old)
    assert torch.equal(before, uninterrupted[..., : 3 * 1920])
    assert relative_error(after[kept], uninterrupted[kept, :, 3 * 1920 :]) < 1e-5
    for row in reset:
        fresh = stream_frames(mimi.decode_stream(batch_size=1), new[row : row + 1])
        assert relative_error(after[row : row + 1], fresh) < 1e-5


def test_reset_rows_past_the_attention_window(tiny_reference_pair):
    # Row 0 is 130 steps into a new stream when row 1, never reset, is past the 250-step window.
    _, tiny = tiny_reference_pair
    generator = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 2048, (2, 8, 130), generator=generator)
    new = torch.randint(0, 2048, (1, 8, 65), generator=generator)
    stream = tiny.decode_stream(batch_size=2)
    stream.step(codes[..., :65])
    stream.reset([0])
    after = stream.step(torch.cat([new, codes[1:, :, 65:]]))
    assert relative_error(after[:1], tiny.decode(new)) < 1e-5
    assert relative_error(after[1:], tiny.decode(codes[1:])[..., 65 * 1920 :]) < 1e-5


@pytest.mark.parametrize(
    ("rows", "error", "message"),
    [
        ([3], ValueError, r"0..2, got 3"),
        ([-1], ValueError, "got -1"),
        ([0.5], ValueError, "0.5"),
        (1, TypeError, "int"),
    ],
    ids=["too-large", "negative", "float", "bare-int"],
)
def test_reset_rejects_bad_rows(mimi, rows, error, message):
    with pytest.raises(error, match=message):
        mimi.decode_stream(batch_size=3).reset(rows)


def test_a_step_of_the_leading_rows_streams_them_on_alone(mimi):
    """Rows 0-1 step without row 2 as they would with it; row 2, reset, starts a new stream."""
    generator = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 2048, (3, 32, 5), generator=generator)
    new = torch.randint(0, 2048, (1, 32, 2), generator=generator)
    whole = stream_frames(mimi.decode_stream(batch_size=3), codes)

    stream = mimi.decode_stream(batch_size=3)
    first = stream.step(codes[:2, :, :1])  # the first step takes every row, row 2 on silence
    middle = stream_frames(stream, codes[:2, :, 1:3])
    assert first.shape == (2, 1, 1920) and middle.shape == (2, 1, 2 * 1920)
    stream.reset([2])
    last = stream_frames(stream, torch.cat([codes[:2, :, 3:], new]))
    assert relative_error(torch.cat([first, middle, last[:2]], dim=-1), whole[:2]) < 1e-5
    assert relative_error(last[2:], stream_frames(mimi.decode_stream(), new)) < 1e-5
