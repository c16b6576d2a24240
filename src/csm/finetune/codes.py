"""Mimi codes of the training audio, encoded once and kept on disk by content.

The cache key is a hash of the audio file's bytes and of the Mimi weights, so a rerun, a
second epoch or another run on the same clips encodes nothing, and other weights never
reuse stale codes. Codes are stored as int16 `.npy` files (they are below 2048).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from csm.audio import load_audio
from csm.finetune.data import Conversation, DataError, Report
from csm.mimi import Mimi


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/csm/codes`, by default `~/.cache/csm/codes`."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "csm" / "codes"


class AudioFileCodeCache:
    """Mimi codes [32, T] (int64) of audio files, kept on disk in `folder` by content, encoded by `mimi` when new."""

    def __init__(self, mimi: Mimi, folder: Path | None = None) -> None:
        self.mimi = mimi
        self.folder = Path(folder) if folder is not None else default_cache_dir()
        self._weights = _fingerprint(mimi)

    def path(self, audio: Path) -> Path:
        digest = hashlib.blake2b(Path(audio).read_bytes(), digest_size=16, key=self._weights).hexdigest()
        return self.folder / digest[:2] / f"{digest}.npy"

    def is_cached(self, audio: Path) -> bool:
        return self.path(audio).is_file()

    def codes(self, audio: Path) -> torch.Tensor:
        stored = self.path(audio)
        if stored.is_file():
            return torch.from_numpy(np.load(stored, allow_pickle=False).astype(np.int64))
        codes = self._encode(audio)
        stored.parent.mkdir(parents=True, exist_ok=True)
        temporary = stored.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(temporary, codes.numpy().astype(np.int16))
        os.replace(temporary, stored)
        return codes

    def _encode(self, audio: Path) -> torch.Tensor:
        wav = load_audio(audio, self.mimi.sample_rate)
        parameter = next(self.mimi.parameters())
        codes = self.mimi.encode(wav.to(parameter.device, parameter.dtype)[None, None])[0]
        return codes.cpu()


def encode_dataset(
    conversations: Sequence[Conversation], cache: AudioFileCodeCache, handle: Report, *, desc: str = "encoding audio"
) -> list[tuple[Conversation, list[torch.Tensor]]]:
    """Each usable conversation with the codes of its segments; broken audio goes to `handle`.

    A progress bar counts the clips that still need encoding.
    """
    to_encode = {segment.audio for conversation in conversations for segment in conversation.segments}
    to_encode = {audio for audio in to_encode if not cache.is_cached(audio)}
    encoded = []
    with tqdm(total=len(to_encode), desc=desc, unit="clip", file=sys.stderr, disable=not to_encode) as bar:
        for conversation in conversations:
            try:
                codes = [_segment_codes(cache, conversation, index, bar) for index in range(len(conversation.segments))]
            except DataError as error:
                handle(error)
                continue
            encoded.append((conversation, codes))
    return encoded


def _segment_codes(cache: AudioFileCodeCache, conversation: Conversation, index: int, bar: tqdm) -> torch.Tensor:
    audio = conversation.segments[index].audio
    fresh = not cache.is_cached(audio)
    try:
        codes = cache.codes(audio)
    except ValueError as error:  # unreadable, empty or non-finite audio
        raise DataError(f"{conversation.where}: segment {index}: {error}") from None
    if fresh:
        bar.update(1)
    return codes


def _fingerprint(mimi: Mimi) -> bytes:
    """A 16-byte digest of the codec's weights: codes from other weights are other codes."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(mimi.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.digest()
