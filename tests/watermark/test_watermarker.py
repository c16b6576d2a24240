"""The Watermarker's surface: rates, shapes, channels, loading and bad input (random weights)."""

import shutil

import pytest
import torch

from csm.errors import CheckpointError, WeightsNotFoundError
from csm.resample import resample
from csm.watermark import Watermarker
from tests.factories.watermark import (
    ITERATION_FOLDER,
    PerfectMessageDecoder,
    ReadoutMessageDecoder,
    write_silentcipher_repo,
)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("silentcipher")
    write_silentcipher_repo(root, seed=1)
    return root


@pytest.fixture(scope="module")
def wm(repo):
    return Watermarker.from_pretrained(repo, device="cpu")


@pytest.fixture
def reads_csm_key(wm):
    """The same networks, with a stand-in message decoder that reads the CSM key anywhere."""
    return Watermarker(wm.encoder, wm.carrier_decoder, PerfectMessageDecoder, device="cpu")


def _speech_like(length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(length) / 24_000
    return 0.1 * torch.sin(2 * torch.pi * 220 * t) + 0.03 * torch.randn(length, generator=generator)


def _sdr(clean: torch.Tensor, marked: torch.Tensor) -> float:
    return float(10 * torch.log10(clean.pow(2).mean() / (marked - clean).pow(2).mean()))


def test_a_24k_clip_is_marked_through_44k_as_csm_does(wm):
    audio = _speech_like(19_200)
    marked = wm.encode(audio, 24_000)
    assert marked.shape == audio.shape and marked.dtype == torch.float32
    # about the requested 36 dB below the signal (the resampling round trip alone
    # already removes the top of the band, so compare with that)
    assert 30 < _sdr(resample(resample(audio, 24_000, 44_100), 44_100, 24_000), marked) < 42
    at_44k = wm.encode(resample(audio, 24_000, 44_100), 44_100)
    torch.testing.assert_close(marked, resample(at_44k, 44_100, 24_000), rtol=0, atol=1e-6)


def test_any_length_and_rate_keeps_its_shape(wm):
    assert wm.encode(_speech_like(12_345), 24_000).shape == (12_345,)
    assert wm.encode(_speech_like(16_001), 16_000).shape == (16_001,)


def test_channels_are_marked_one_by_one_and_silent_ones_left_alone(wm):
    left = _speech_like(9_600, seed=1)
    stereo = torch.stack([left, torch.zeros(9_600)])
    marked = wm.encode(stereo, 24_000, key=[1, 2, 3, 4, 5])
    assert marked.shape == (2, 9_600)
    torch.testing.assert_close(marked[0], wm.encode(left, 24_000, key=[1, 2, 3, 4, 5]), rtol=0, atol=0)
    assert torch.equal(marked[1], stereo[1])


def test_silence_is_returned_unchanged_and_never_verifies(wm):
    silence = torch.zeros(48_000)
    assert torch.equal(wm.encode(silence, 24_000), silence)
    assert wm.decode(silence, 24_000)["status"] is False
    assert wm.verify(silence, 24_000) is False


def test_a_clip_too_short_to_read_gives_a_clear_result(reads_csm_key):
    short = _speech_like(21_000)  # 0.88 s: under the 38,904 samples at 44.1 kHz the search needs
    result = reads_csm_key.decode(short, 24_000)
    assert result["status"] is False and result["messages"] == [] and "too short" in result["error"]
    assert reads_csm_key.verify(short, 24_000) is False
    # without the search, 36,864 samples at 44.1 kHz (21 frames) are enough
    assert reads_csm_key.decode(_speech_like(36_864), 44_100, phase_shift_decoding=False)["status"]
    assert not reads_csm_key.decode(_speech_like(36_863), 44_100, phase_shift_decoding=False)["status"]
    assert reads_csm_key.decode(_speech_like(38_904), 44_100)["status"]
    assert not reads_csm_key.decode(_speech_like(38_903), 44_100)["status"]


def test_verify_compares_the_decoded_message_with_the_key(reads_csm_key):
    clip = _speech_like(48_000)
    assert reads_csm_key.verify(clip, 24_000)
    assert not reads_csm_key.verify(clip, 24_000, key=[1, 2, 3, 4, 5])
    stereo = torch.stack([clip, torch.zeros_like(clip)])
    assert reads_csm_key.verify(stereo, 24_000)  # one marked channel is enough
    assert [result["status"] for result in reads_csm_key.decode(stereo, 24_000)] == [True, False]


def test_batched_search_gives_the_unbatched_result(repo):
    clip = _speech_like(46_000, seed=4)  # 43 frames at 44.1 kHz: two message rows
    one_by_one = Watermarker.from_pretrained(repo, device="cpu")
    batched = Watermarker.from_pretrained(repo, device="cpu", search_batch_frames=2_000)
    one_by_one._message_decoder, batched._message_decoder = ReadoutMessageDecoder(2), ReadoutMessageDecoder(2)
    assert batched.decode(clip, 24_000) == one_by_one.decode(clip, 24_000)
    assert one_by_one._message_decoder.calls == 205
    assert batched._message_decoder.calls < 10


def test_progress_counts_the_cuts_read(repo, reads_csm_key):
    counted = []
    assert reads_csm_key.verify(_speech_like(48_000), 24_000, progress=counted.append)
    assert counted == [1]  # a perfect reading at the first cut ends the search
    full_search = Watermarker.from_pretrained(repo, device="cpu")
    full_search._message_decoder = ReadoutMessageDecoder(2)
    counted = []
    full_search.decode(_speech_like(46_000, seed=4), 24_000, progress=counted.append)
    assert sum(counted) == 205 and len(counted) == full_search._message_decoder.calls


def test_batches_keep_shift_order_and_equal_frame_counts(wm):
    batched = Watermarker(wm.encoder, wm.carrier_decoder, lambda: None, device="cpu", search_batch_frames=100)
    length = 4096 * 10 + 1000  # the frame count drops once the cut passes 1000 samples
    batches = list(batched._shift_batches(length, range(0, 2048, 10)))
    assert batches[0] == [0]
    assert [shift for batch in batches for shift in batch] == list(range(0, 2048, 10))
    assert all(len(batch) <= 4 for batch in batches)  # 100 // 23 frames
    assert not any(batch[0] <= 1000 < batch[-1] for batch in batches)


@pytest.mark.parametrize(
    "audio, rate, message",
    [
        (torch.tensor([0.1, float("nan")] * 10_000), 24_000, "NaN or infinite"),
        (torch.zeros(2, 2, 100), 24_000, "channels, samples"),
        (torch.zeros(0), 24_000, "not empty"),
        (torch.zeros(100, dtype=torch.int16), 24_000, "floating point"),
        (torch.zeros(100), 0, "sample_rate"),
    ],
)
def test_bad_audio_is_refused_clearly(wm, audio, rate, message):
    with pytest.raises(ValueError, match=message):
        wm.encode(audio, rate)
    with pytest.raises(ValueError, match=message):
        wm.verify(audio, rate)


def test_bad_keys_are_refused(wm):
    with pytest.raises(ValueError, match="5 integers"):
        wm.encode(_speech_like(1000), 24_000, key=[1, 2, 3])
    with pytest.raises(ValueError, match="5 integers"):
        wm.verify(_speech_like(1000), 24_000, key=[1, 2, 3, 4, 300])


def test_the_iteration_folder_works_as_a_source(repo, wm):
    from_folder = Watermarker.from_pretrained(repo / ITERATION_FOLDER, device="cpu")
    audio = _speech_like(4_800)
    assert torch.equal(from_folder.encode(audio, 24_000), wm.encode(audio, 24_000))


def test_embedding_never_needs_the_message_decoder(repo, tmp_path):
    shutil.copytree(repo / ITERATION_FOLDER, tmp_path, dirs_exist_ok=True)
    (tmp_path / "dec_m_0.ckpt").unlink()
    partial = Watermarker.from_pretrained(tmp_path, device="cpu")
    partial.encode(_speech_like(4_800), 24_000)
    with pytest.raises(WeightsNotFoundError, match="dec_m_0.ckpt"):
        partial.decode(_speech_like(48_000), 24_000)


def test_missing_or_broken_checkpoints_fail_clearly(repo, tmp_path):
    with pytest.raises(WeightsNotFoundError, match="enc_c.ckpt"):
        Watermarker.from_pretrained(tmp_path)
    shutil.copytree(repo / ITERATION_FOLDER, tmp_path, dirs_exist_ok=True)
    (tmp_path / "enc_c.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        Watermarker.from_pretrained(tmp_path)
    state = torch.load(repo / ITERATION_FOLDER / "dec_c.ckpt", weights_only=True)
    del state["module.main.2.gate.bias"]
    state["module.extra"] = torch.zeros(1)
    shutil.copy(repo / ITERATION_FOLDER / "enc_c.ckpt", tmp_path / "enc_c.ckpt")
    torch.save(state, tmp_path / "dec_c.ckpt")
    with pytest.raises(CheckpointError, match=r"missing: layers\.2\.gate\.bias; unexpected: extra"):
        Watermarker.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a file"):
        Watermarker.from_pretrained(tmp_path / "enc_c.ckpt")
