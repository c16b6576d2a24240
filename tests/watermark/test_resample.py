from pathlib import Path

import pytest
import torch

from csm.resample import resample

# Outputs of torchaudio's functional.resample (default arguments, float32) for fixed
# inputs, computed once from its published algorithm.
FIXTURE = torch.load(Path(__file__).with_name("resample_torchaudio.pt"), weights_only=True)


@pytest.mark.parametrize("name", ["short", "frame"])
def test_24k_to_44k_and_back_matches_torchaudio(name):
    up = resample(FIXTURE[f"{name}_24k"], 24_000, 44_100)
    torch.testing.assert_close(up, FIXTURE[f"{name}_up_44k"], rtol=0, atol=1e-6)
    back = resample(FIXTURE[f"{name}_up_44k"], 44_100, 24_000)
    torch.testing.assert_close(back, FIXTURE[f"{name}_back_24k"], rtol=0, atol=1e-6)


def test_batched_channels_match_torchaudio():
    down = resample(FIXTURE["stereo_48k"], 48_000, 16_000)
    torch.testing.assert_close(down, FIXTURE["stereo_down_16k"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("length", [1920, 3 * 1920, 24_000])
def test_multiples_of_1920_keep_their_length_through_the_round_trip(length):
    audio = torch.randn(length, generator=torch.Generator().manual_seed(length))
    up = resample(audio, 24_000, 44_100)
    assert up.shape == (length * 147 // 80,)
    assert resample(up, 44_100, 24_000).shape == (length,)


def test_other_lengths_round_up():
    assert resample(torch.zeros(333), 24_000, 44_100).shape == (612,)  # ceil(333 * 147 / 80)


def test_same_rate_is_the_identity_and_bad_arguments_are_refused():
    audio = torch.randn(100)
    assert resample(audio, 24_000, 24_000) is audio
    with pytest.raises(ValueError, match="positive"):
        resample(audio, 0, 24_000)
    with pytest.raises(ValueError, match="floating point"):
        resample(torch.zeros(10, dtype=torch.int16), 24_000, 44_100)
