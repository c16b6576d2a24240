"""Audio files in and out: mono float32 tensors at one sample rate, written atomically.

Reading accepts anything libsndfile reads (wav, flac, ogg, ...), downmixes to mono and
resamples with soxr. Writing picks the container from the file extension, or raw 16-bit
PCM for a binary stream, and never leaves a half-written file behind.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile
import soxr
import torch

# Container and sample encoding per output extension: 16-bit PCM plays everywhere and
# keeps the watermark (its quantisation noise is ~60 dB below the watermark's).
_FORMATS = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
}


def load_audio(path: str | os.PathLike, sample_rate: int = 24_000) -> torch.Tensor:
    """The file at `path` as a 1-D float32 tensor: channels averaged, resampled to `sample_rate`."""
    audio, file_rate = read_audio(path)
    if file_rate != sample_rate:
        audio = torch.from_numpy(soxr.resample(audio.numpy(), file_rate, sample_rate))
    return audio


def read_audio(path: str | os.PathLike) -> tuple[torch.Tensor, int]:
    """The file at `path` at its own sample rate: (1-D float32 tensor, sample rate)."""
    if not Path(path).expanduser().is_file():
        raise ValueError(f"audio file {path} does not exist")
    try:
        samples, file_rate = soundfile.read(Path(path).expanduser(), dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError) as error:
        raise ValueError(f"cannot read audio file {path}: {_reason(error)}") from None
    mono = samples.mean(axis=1)
    if mono.size == 0:
        raise ValueError(f"audio file {path} has no samples")
    return check_audio(torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32)), str(path)), file_rate


def check_audio(audio: torch.Tensor, name: str = "audio") -> torch.Tensor:
    """`audio` itself when it is a non-empty, finite, 1-D tensor; a ValueError saying why not."""
    if not isinstance(audio, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(audio).__name__}")
    if audio.ndim != 1:
        raise ValueError(f"{name} must be 1-D (mono samples), got shape {tuple(audio.shape)}")
    if audio.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(audio).all():
        raise ValueError(f"{name} contains NaN or infinite samples")
    return audio


def output_format(path: str | os.PathLike) -> tuple[str, str]:
    """The (container, encoding) written for `path`, chosen by its extension."""
    extension = Path(path).suffix.lower()
    if extension not in _FORMATS:
        raise ValueError(
            f"cannot tell the audio format of {path}: use one of {', '.join(_FORMATS)}, or '-' for raw PCM"
        )
    return _FORMATS[extension]


def check_writable(path: str | os.PathLike) -> None:
    """Fail now, not after minutes of generation, if `path` cannot be written."""
    output_format(path)
    target = Path(path).expanduser()
    folder = target.parent
    if target.is_dir():
        raise ValueError(f"output path {target} is a folder")
    if not folder.is_dir():
        raise ValueError(f"cannot write {target}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ValueError(f"cannot write {target}: permission denied")


def save_audio(path: str | os.PathLike, audio: torch.Tensor, sample_rate: int) -> None:
    """Write mono `audio` to `path` through a temporary file in the same folder and a rename."""
    container, encoding = output_format(path)
    target = Path(path).expanduser()
    samples = _to_numpy(audio)
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    # Created like any new file (mode 0o666 less the umask), unlike mkstemp's private 0o600.
    os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        soundfile.write(temporary, samples, sample_rate, format=container, subtype=encoding)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def pcm16_bytes(audio: torch.Tensor) -> bytes:
    """`audio` as raw little-endian signed 16-bit PCM."""
    return (_to_numpy(audio) * 32767.0).round().astype("<i2").tobytes()


def write_pcm16(stream: BinaryIO, audio: torch.Tensor) -> None:
    """Append `audio` to a binary stream (e.g. stdout) as raw 16-bit PCM and flush it."""
    stream.write(pcm16_bytes(audio))
    stream.flush()


def _to_numpy(audio: torch.Tensor) -> np.ndarray:
    if not isinstance(audio, torch.Tensor) or audio.ndim != 1:
        raise ValueError("audio to write must be a 1-D tensor of mono samples")
    # Clip: integer encodings would wrap around on samples beyond full scale.
    return audio.detach().to("cpu", torch.float32).clamp(-1.0, 1.0).numpy()


def _reason(error: Exception) -> str:
    # libsndfile says "Error opening '<path>': <reason>"; the path is already in our message.
    return str(error).rsplit(": ", 1)[-1].strip() or type(error).__name__
