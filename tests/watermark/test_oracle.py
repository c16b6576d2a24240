"""Our watermark against the original silentcipher package (PyPI 1.0.5) on the same random weights."""

import sys
import types

import numpy as np
import pytest
import torch

from csm.watermark import CSM_KEY, Watermarker, spectrum
from tests.factories.watermark import (
    PerfectMessageDecoder,
    ReadoutMessageDecoder,
    write_silentcipher_repo,
)


def _import_original():
    # silentcipher imports librosa (resampling) and pydub (file reading) at module level;
    # at 44.1 kHz with in-memory audio it never calls them, so empty stand-ins suffice.
    sys.modules.setdefault("librosa", types.ModuleType("librosa"))
    if "pydub" not in sys.modules:
        pydub = types.ModuleType("pydub")
        pydub.AudioSegment = None
        sys.modules["pydub"] = pydub
    import silentcipher

    return silentcipher


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_silentcipher_repo(tmp_path_factory.mktemp("silentcipher"), seed=0)


@pytest.fixture
def original(folder):
    model = _import_original().get_model(
        model_type="44.1k", ckpt_path=str(folder), config_path=str(folder / "hparams.yaml"), device="cpu"
    )
    return model


@pytest.fixture
def ours(folder):
    return Watermarker.from_pretrained(folder.parent.parent, device="cpu")


def _clip(length: int, seed: int) -> np.ndarray:
    generator = np.random.default_rng(seed)
    # a few tones under noise, fading in, so that frames differ in level and spectrum
    t = np.arange(length) / 44_100
    tones = sum(np.sin(2 * np.pi * f * t + generator.uniform(0, 6)) for f in generator.uniform(100, 4000, 4))
    noise = generator.standard_normal(length)
    return ((0.05 * tones + 0.02 * noise) * np.linspace(0.2, 1, length)).astype(np.float32)


# An exact multiple of 4096 and clips shorter than one message period (21 frames).
@pytest.mark.parametrize("length", [9 * 4096, 1000, 20_000])
def test_embedding_matches_the_original(original, ours, length):
    audio = _clip(length, seed=length)
    expected, _ = original.encode_wav(audio, 44_100, list(CSM_KEY), message_sdr=36, calc_sdr=False)
    marked = ours.encode(torch.from_numpy(audio), 44_100).numpy()
    assert marked.shape == expected.shape == audio.shape
    assert np.abs(marked - audio).max() > 1e-3  # the watermark is there
    assert np.abs(marked - expected).max() <= 1e-6 * np.abs(expected).max()


def test_embedding_another_key_and_strength_matches_the_original(original, ours):
    audio = _clip(30_000, seed=1)
    key = [1, 2, 3, 254, 255]
    expected, _ = original.encode_wav(audio, 44_100, key, message_sdr=47, calc_sdr=False)
    marked = ours.encode(torch.from_numpy(audio), 44_100, key=key, message_sdr=47).numpy()
    assert np.abs(marked - expected).max() <= 1e-6 * np.abs(expected).max()


def test_message_decoder_and_decoding_match_the_original(original, ours):
    audio = _clip(40_000, seed=3)  # 21 frames: one message row, one network pass
    magnitude = spectrum.magnitude(spectrum.spectrogram(torch.from_numpy(audio)[None]))[:, None]
    with torch.inference_mode():
        expected = original.dec_m[0](magnitude)[:, 0]
        torch.testing.assert_close(ours.message_decoder(magnitude), expected, rtol=1e-5, atol=1e-5)
    assert ours.decode(torch.from_numpy(audio), 44_100, False) == original.decode_wav(audio, 44_100, False)


def _for_original(decoder):
    # the original's decoder gives logits (B, 1, 5, T); ours (B, 5, T)
    return lambda magnitude: decoder(magnitude)[:, None]


# Both sides with the same cheap stand-in decoder, so that the full 205-shift search runs.
# These seeds give: a message without the search but none with it, a message both ways,
# and perfect scores that end the search at shifts 730 and 0.
@pytest.mark.parametrize("seed", [1, 2, 3, 5])
def test_phase_shift_search_and_decoding_match_the_original(original, ours, seed):
    readout = ReadoutMessageDecoder(seed)
    original.dec_m = [_for_original(readout)]
    ours._message_decoder = readout
    audio = _clip(2 * 44_100 + 77 * seed, seed=seed)
    for phase_shift_decoding in (False, True):
        expected = original.decode_wav(audio, 44_100, phase_shift_decoding=phase_shift_decoding)
        assert ours.decode(torch.from_numpy(audio), 44_100, phase_shift_decoding) == expected


def test_search_stops_at_the_first_perfect_score_with_the_original_result(original, ours):
    original.dec_m = [_for_original(PerfectMessageDecoder())]
    ours._message_decoder = PerfectMessageDecoder()
    audio = _clip(45_000, seed=9)
    result = ours.decode(torch.from_numpy(audio), 44_100)
    assert result == original.decode_wav(audio, 44_100, phase_shift_decoding=True)
    assert result["messages"] == [list(CSM_KEY)] and result["confidences"] == [1.0]
    assert ours._message_decoder.calls == 1
