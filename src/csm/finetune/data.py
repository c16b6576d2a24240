"""Training data: conversations read from a JSONL manifest or a folder of transcribed clips.

A manifest holds one conversation per line,
`{"segments": [{"audio": "a.wav", "text": "...", "speaker": 0, "train": true}, ...]}`, with
audio paths relative to the manifest; `train` defaults to true, and a segment with
`"train": false` is context only. A folder holds audio files, each with its transcript in a
`.txt` file of the same name beside it: one speaker (0), one trained segment per clip.

Every problem found is a `DataError` that says where it is (the manifest line, or the clip);
`read_dataset` raises the first one, or with `on_error="skip"` leaves the entry out and
reports it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from csm.errors import CSMError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus")
ON_ERROR = ("fail", "skip")


class DataError(CSMError):
    """A broken dataset entry; the message starts with where it is."""


@dataclass(frozen=True)
class SegmentEntry:
    audio: Path
    text: str
    speaker: int
    train: bool = True


@dataclass(frozen=True)
class Conversation:
    segments: tuple[SegmentEntry, ...]
    # Where it comes from, for messages: "data.jsonl line 3" or a clip's path.
    where: str


Report = Callable[[DataError], None]


def read_dataset(path: str | Path, on_error: str = "fail", report: Report | None = None) -> list[Conversation]:
    """The conversations of a manifest file or a folder of clips.

    With `on_error="skip"` a broken entry is passed to `report` and left out; with "fail"
    (the default) its `DataError` is raised.
    """
    handle = problem_handler(on_error, report)
    path = Path(path).expanduser()
    if path.is_dir():
        conversations = _read_folder(path, handle)
    elif path.is_file():
        conversations = _read_manifest(path, handle)
    else:
        raise DataError(f"dataset {path} does not exist (expected a JSONL manifest or a folder of clips)")
    if not conversations:
        raise DataError(f"dataset {path} holds no usable conversation")
    return conversations


def problem_handler(on_error: str, report: Report | None) -> Report:
    """What to do with a broken entry: raise it ("fail") or pass it to `report` ("skip")."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")

    def handle(error: DataError) -> None:
        if on_error == "fail":
            raise error
        if report is not None:
            report(error)

    return handle


def _read_manifest(path: Path, handle: Report) -> list[Conversation]:
    conversations = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a UTF-8 text file (expected one JSON object per line)") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            conversations.append(Conversation(_parse_segments(line, path.parent, where), where))
        except DataError as error:
            handle(error)
    return conversations


def _parse_segments(line: str, root: Path, where: str) -> tuple[SegmentEntry, ...]:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not valid JSON: {error.msg}") from None
    segments = entry.get("segments") if isinstance(entry, dict) else None
    if not isinstance(segments, list) or not segments:
        raise DataError(f'{where}: expected an object with a non-empty list "segments"')
    parsed = tuple(_parse_segment(segment, root, f"{where}: segment {index}") for index, segment in enumerate(segments))
    if not any(segment.train for segment in parsed):
        raise DataError(f'{where}: every segment has "train": false, so nothing would be learned from it')
    return parsed


def _parse_segment(segment, root: Path, where: str) -> SegmentEntry:
    if not isinstance(segment, dict):
        raise DataError(f'{where}: expected an object with "audio", "text" and "speaker"')
    audio, text, speaker, train = (segment.get(key) for key in ("audio", "text", "speaker", "train"))
    if not isinstance(audio, str) or not audio:
        raise DataError(f'{where}: "audio" must be a path, got {audio!r}')
    if not isinstance(text, str) or not text.strip():
        raise DataError(f'{where}: "text" is empty')
    if not isinstance(speaker, int) or isinstance(speaker, bool) or speaker < 0:
        raise DataError(f'{where}: "speaker" must be a non-negative integer, got {speaker!r}')
    if train is not None and not isinstance(train, bool):
        raise DataError(f'{where}: "train" must be true or false, got {train!r}')
    path = (root / audio).expanduser()
    if not path.is_file():
        raise DataError(f"{where}: audio file {path} does not exist")
    return SegmentEntry(path, text.strip(), speaker, train is not False)


def _read_folder(folder: Path, handle: Report) -> list[Conversation]:
    conversations = []
    clips = sorted(path for path in folder.rglob("*") if path.suffix.lower() in AUDIO_EXTENSIONS and path.is_file())
    for clip in clips:
        transcript = clip.with_suffix(".txt")
        try:
            if not transcript.is_file():
                raise DataError(f"{clip}: no transcript {transcript.name} beside it")
            text = transcript.read_text(encoding="utf-8").strip()
            if not text:
                raise DataError(f"{clip}: transcript {transcript.name} is empty")
            conversations.append(Conversation((SegmentEntry(clip, text, 0),), str(clip)))
        except DataError as error:
            handle(error)
        except UnicodeDecodeError:
            handle(DataError(f"{clip}: transcript {transcript.name} is not UTF-8 text"))
    return conversations
