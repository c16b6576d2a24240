"""Voices a request can name: built-in prompts, OpenAI's voice names, and uploaded voices.

A voice is what CSM hears before the text: context segments (audio plus transcript) and
the speaker id to speak as. Uploaded voices live in a folder, one sub-folder per voice
(`audio.wav`, float32 so it reads back bit for bit, and `voice.json`), each written under
a temporary name, flushed to disk and renamed into place whole: a crash leaves either the
whole voice or a temporary folder that the next start removes. Only the metadata of stored
voices stays in memory (listing reads nothing else); their audio is read when a request
names them and kept in a small LRU cache, so memory does not grow with the number stored.
Ids are generated here and checked against their pattern before any path is built, so no
name or id reaches outside the folder. The folder may be shared by several processes (the
replicas of `csm.cluster`, on one machine or on shared storage): a voice another process wrote
is found when a request names it or the voices are listed, and one it deleted is forgotten.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import soundfile
import torch

from csm.errors import CSMError
from csm.generator import Segment
from csm.server.errors import APIError
from csm.server.protocol import Voice
from csm.voices import VOICE_TRANSCRIPTS, load_voice

log = logging.getLogger("csm.server")

SAMPLE_RATE = 24_000
# OpenAI's voice names, which clients hard-code; each maps to one fixed csm voice.
OPENAI_VOICES = (
    "alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse", "marin", "cedar",
)  # fmt: skip
DEFAULT_MAX_VOICES = 1000
# Stored voices whose audio stays in memory between requests (at most 30 s, 2.9 MB, each).
CACHED_VOICES = 16
_STORED_ID = re.compile(r"voice_[0-9a-f]{16}")
_INCOMING, _DELETED = ".incoming-", ".deleted-"


@dataclass(frozen=True)
class VoicePrompt:
    """What a voice puts before the text: context segments, a speaker id, a default seed."""

    prompts: tuple[Segment, ...]
    speaker: int
    seed: int | None


@dataclass(frozen=True)
class StoredVoice:
    """An uploaded voice's metadata; its audio stays on disk (`VoiceStore.audio`)."""

    id: str
    name: str
    text: str
    created_at: int

    def listing(self) -> Voice:
        return Voice(id=self.id, name=self.name, created_at=self.created_at, kind="stored", description=self.text)


class VoiceLimitError(Exception):
    """The store holds its most voices: delete one before adding another."""


class VoiceStore:
    """Uploaded voices in `folder`, at most `max_voices`; safe to use from several threads."""

    def __init__(self, folder: str | os.PathLike, max_voices: int = DEFAULT_MAX_VOICES):
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_voices = max_voices
        self._lock = threading.Lock()
        self._voices: dict[str, StoredVoice] = {}
        self._audio: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._adding = 0  # uploads being written, counted against max_voices
        for entry in sorted(self.folder.iterdir()):
            if entry.name.startswith((_INCOMING, _DELETED)):
                # Left by an interrupted upload or deletion: never a complete voice.
                shutil.rmtree(entry, ignore_errors=True)
            elif _STORED_ID.fullmatch(entry.name):
                self._load(entry)

    def _load(self, entry: Path) -> None:
        try:
            meta = json.loads((entry / "voice.json").read_text(encoding="utf-8"))
            info = soundfile.info(entry / "audio.wav")
            if info.samplerate != SAMPLE_RATE or info.channels != 1:
                raise ValueError(f"expected mono {SAMPLE_RATE} Hz audio, got {info.channels} x {info.samplerate} Hz")
            voice = StoredVoice(entry.name, str(meta["name"]), str(meta["text"]), int(meta["created_at"]))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, soundfile.SoundFileError) as error:
            log.warning("skipping stored voice %s: %s", entry.name, error)
            return
        self._voices[voice.id] = voice

    def __len__(self) -> int:
        return len(self._voices)

    def cached(self) -> int:
        """How many voices' audio is in memory now (at most `CACHED_VOICES`)."""
        with self._lock:
            return len(self._audio)

    def list(self) -> list[StoredVoice]:
        """Every voice in the folder, including those other processes added (blocking: reads the folder)."""
        on_disk = {entry.name for entry in self.folder.iterdir() if _STORED_ID.fullmatch(entry.name)}
        with self._lock:
            for voice_id in set(self._voices) - on_disk:
                self._forget(voice_id)
            for voice_id in sorted(on_disk - set(self._voices)):
                self._load(self.folder / voice_id)
            return sorted(self._voices.values(), key=lambda voice: (voice.created_at, voice.id))

    def get(self, voice_id: str) -> StoredVoice | None:
        """The voice if its folder is there (blocking: looks at the folder, which others may change)."""
        if not _STORED_ID.fullmatch(voice_id):
            return None
        on_disk = (self.folder / voice_id).is_dir()
        with self._lock:
            if not on_disk:
                self._forget(voice_id)  # deleted by another process
            elif voice_id not in self._voices:
                self._load(self.folder / voice_id)  # added by another process
            return self._voices.get(voice_id)

    def _forget(self, voice_id: str) -> None:
        self._voices.pop(voice_id, None)
        self._audio.pop(voice_id, None)

    def audio(self, voice: StoredVoice) -> torch.Tensor:
        """The voice's audio: from the cache, or read from disk (blocking: call it off the event loop)."""
        with self._lock:
            if voice.id in self._audio:
                self._audio.move_to_end(voice.id)
                return self._audio[voice.id]
        samples, _ = soundfile.read(self.folder / voice.id / "audio.wav", dtype="float32")
        audio = torch.from_numpy(samples)
        with self._lock:
            if voice.id in self._voices:  # not deleted meanwhile
                self._audio[voice.id] = audio
                while len(self._audio) > CACHED_VOICES:
                    self._audio.popitem(last=False)
        return audio

    def check_room(self) -> None:
        """A VoiceLimitError when no voice can be added now."""
        with self._lock:
            self._check_room()

    def add(self, name: str, text: str, audio: torch.Tensor) -> StoredVoice:
        with self._lock:
            self._check_room()
            self._adding += 1
        try:
            voice = StoredVoice(f"voice_{secrets.token_hex(8)}", name, text, int(time.time()))
            self._write(voice, audio.to("cpu", torch.float32))
            with self._lock:
                self._voices[voice.id] = voice
        finally:
            with self._lock:
                self._adding -= 1
        return voice

    def _check_room(self) -> None:
        if len(self._voices) + self._adding >= self.max_voices:
            raise VoiceLimitError(
                f"this server keeps at most {self.max_voices} voices (--max-voices) and has them all: delete one first"
            )

    def _write(self, voice: StoredVoice, audio: torch.Tensor) -> None:
        incoming = self.folder / f"{_INCOMING}{voice.id}"
        incoming.mkdir()
        try:
            soundfile.write(incoming / "audio.wav", audio.numpy(), SAMPLE_RATE, format="WAV", subtype="FLOAT")
            meta = {"id": voice.id, "name": voice.name, "text": voice.text, "created_at": voice.created_at}
            (incoming / "voice.json").write_text(json.dumps(meta), encoding="utf-8")
            for path in (incoming / "audio.wav", incoming / "voice.json", incoming):
                _flush(path)
            os.rename(incoming, self.folder / voice.id)
            _flush(self.folder)
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            raise

    def delete(self, voice_id: str) -> bool:
        if not _STORED_ID.fullmatch(voice_id):
            return False
        if self.get(voice_id) is None:
            return False
        doomed = self.folder / f"{_DELETED}{voice_id}"
        with self._lock:
            self._forget(voice_id)
            try:
                os.rename(self.folder / voice_id, doomed)
            except FileNotFoundError:
                return False  # deleted by another process meanwhile
        shutil.rmtree(doomed, ignore_errors=True)
        return True


def _flush(path: Path) -> None:
    """Its data on disk before the rename that publishes it (a power cut keeps no half voice)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class Voices:
    """Resolves the `voice` of a request; lists every voice there is."""

    def __init__(self, builtin: dict[str, Segment], store: VoiceStore):
        self.builtin = builtin
        self.store = store
        # OpenAI names alternate between the built-in voices, or are fixed speaker/seed pairs.
        names = sorted(builtin)
        self.openai = {
            name: VoicePrompt((builtin[names[i % len(names)]],), 0, None) if names else VoicePrompt((), i % 2, i)
            for i, name in enumerate(OPENAI_VOICES)
        }

    def resolve(self, voice_id: str) -> VoicePrompt:
        """The voice a request names; reads a stored voice's audio from disk (call it off the event loop)."""
        if voice_id in self.builtin:
            return VoicePrompt((self.builtin[voice_id],), 0, None)
        if voice_id in self.openai:
            return self.openai[voice_id]
        stored = self.store.get(voice_id)
        try:
            audio = None if stored is None else self.store.audio(stored)
        except (OSError, RuntimeError, soundfile.SoundFileError):
            audio = None  # deleted while this request read it
        if stored is None or audio is None:
            raise APIError(
                400, f"unknown voice {voice_id!r}: see GET /v1/audio/voices", param="voice", code="voice_not_found"
            )
        return VoicePrompt((Segment(speaker=0, text=stored.text, audio=audio),), 0, None)

    def mapping(self, name: str) -> str:
        """What an OpenAI voice name stands for, in words."""
        voice = self.openai[name]
        if voice.prompts:
            return next(key for key, segment in self.builtin.items() if segment is voice.prompts[0])
        return f"speaker {voice.speaker}, seed {voice.seed}"

    def listing(self) -> list[Voice]:
        voices = [Voice(id=name, name=name, created_at=0, kind="builtin") for name in sorted(self.builtin)]
        voices += [
            Voice(id=name, name=name, created_at=0, kind="openai", description=f"same as {self.mapping(name)}")
            for name in OPENAI_VOICES
        ]
        return voices + [voice.listing() for voice in self.store.list()]


def builtin_voices(model: str) -> dict[str, Segment]:
    """The model folder's prompt voices that can be read (none is fine: OpenAI names fall back)."""
    voices = {}
    for name in VOICE_TRANSCRIPTS:
        try:
            voices[name] = load_voice(name, speaker=0, model=model)
        except (CSMError, ValueError, OSError) as error:
            log.info("built-in voice %s unavailable: %s", name, error)
    return voices
