"""Audio files in and out: formats, downmixing, resampling, raw PCM, atomic writes, bad files."""

import io
import os

import numpy as np
import pytest
import soundfile
import torch

from csm import audio


def _tone(seconds: float = 0.5, rate: int = 24_000) -> torch.Tensor:
    t = torch.arange(int(seconds * rate)) / rate
    return (0.5 * torch.sin(2 * torch.pi * 440 * t)).float()


@pytest.mark.parametrize("extension, tolerance", [(".wav", 1e-4), (".flac", 1e-4), (".ogg", 0.1)])
def test_written_files_read_back(tmp_path, extension, tolerance):
    path = tmp_path / f"out{extension}"
    tone = _tone()
    audio.save_audio(path, tone, 24_000)
    back = audio.load_audio(path)
    assert back.dtype == torch.float32 and back.ndim == 1
    assert soundfile.info(str(path)).samplerate == 24_000
    assert back.shape == tone.shape
    assert (back - tone).abs().max() < tolerance


def test_written_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        audio.save_audio(tmp_path / "out.wav", _tone(0.1), 24_000)
    finally:
        os.umask(umask)
    assert (tmp_path / "out.wav").stat().st_mode & 0o777 == 0o644


def test_stereo_is_downmixed_and_resampled(tmp_path):
    rate = 16_000
    left = np.linspace(-0.5, 0.5, rate, dtype=np.float32)
    path = tmp_path / "stereo.flac"
    soundfile.write(path, np.stack([left, -left + 0.2], axis=1), rate)
    mono, file_rate = audio.read_audio(path)
    assert file_rate == rate
    np.testing.assert_allclose(mono.numpy(), 0.1, atol=1e-4)
    assert audio.load_audio(path, 24_000).shape == (24_000,)


def test_samples_beyond_full_scale_are_clipped_not_wrapped():
    raw = audio.pcm16_bytes(torch.tensor([0.0, 0.5, 2.0, -2.0]))
    assert np.frombuffer(raw, dtype="<i2").tolist() == [0, 16384, 32767, -32767]


def test_raw_pcm_goes_to_a_binary_stream():
    stream = io.BytesIO()
    audio.write_pcm16(stream, _tone(0.1))
    assert len(stream.getvalue()) == 2 * 2400


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "keep.wav"
    audio.save_audio(path, _tone(), 24_000)
    before = path.read_bytes()

    def fail(file, *args, **kwargs):
        with open(file, "wb") as partial:
            partial.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(audio.soundfile, "write", fail)
    with pytest.raises(OSError, match="disk full"):
        audio.save_audio(path, _tone(0.2), 24_000)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.wav"]


@pytest.mark.parametrize(
    "content, message",
    [(None, "does not exist"), (b"not audio at all" * 8, "cannot read audio file")],
)
def test_unreadable_files_are_value_errors(tmp_path, content, message):
    path = tmp_path / "in.wav"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        audio.load_audio(path)


def test_non_finite_audio_is_refused(tmp_path):
    path = tmp_path / "nan.wav"
    soundfile.write(path, np.array([0.0, np.nan, 0.1], dtype=np.float32), 24_000, subtype="FLOAT")
    with pytest.raises(ValueError, match="NaN or infinite"):
        audio.load_audio(path)


def test_output_paths_are_checked_before_any_work(tmp_path):
    audio.check_writable(tmp_path / "fine.flac")
    with pytest.raises(ValueError, match="format"):
        audio.check_writable(tmp_path / "out.mp4")
    with pytest.raises(ValueError, match="does not exist"):
        audio.check_writable(tmp_path / "missing" / "out.wav")
    (tmp_path / "folder.wav").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        audio.check_writable(tmp_path / "folder.wav")
