"""`csm say --batch`: one file per line, through the engine."""

import json

import pytest
import soundfile

from tests.product.test_cli import _csm, _exit_status, _sources

FRAME = 1920


def test_each_line_becomes_a_file_named_by_its_line(assets, tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text(
        "Hello there.\n\n"
        + json.dumps({"text": "A voice speaks.", "speaker": 1, "voice": "conversational_a", "seed": 4})
        + "\nLast line here.\n"
    )
    folder = tmp_path / "out"
    done = _csm(
        "say",
        "--batch",
        str(lines),
        "-o",
        str(folder),
        "--seed",
        "1",
        "--max-seconds",
        "0.16",
        "--max-batch",
        "2",
        *_sources(assets),
    )
    assert done.returncode == 0, done.stderr.decode()
    assert sorted(path.name for path in folder.iterdir()) == ["0001.wav", "0003.wav", "0004.wav"]
    for path in folder.iterdir():
        info = soundfile.info(str(path))
        assert (info.samplerate, info.channels, info.frames) == (24_000, 1, 2 * FRAME)
    stderr = done.stderr.decode()
    assert "utterance" in stderr  # the progress bar counts finished utterances
    summary = stderr.strip().splitlines()[-1]
    assert summary.startswith(f"{folder}: 3 files, 0.48 s of audio in ") and "frames/s" in summary


@pytest.mark.parametrize(
    "content, extra, message",
    [
        ("", [], "has no text"),
        ("{not json\n", [], ":1: not valid JSON"),
        ('{"text": "Hi.", "volume": 3}\n', [], "unknown fields ['volume']"),
        ('Hi.\n{"text": ""}\n', [], ":2: text must be a non-empty string"),
        ('{"text": "Hi.", "speaker": "a"}\n', [], "speaker must be a non-negative integer"),
        ('{"text": "Hi.", "voice": "nobody"}\n', [], "unknown voice 'nobody'"),
        ("Hi.\n", ["Some text."], "give no TEXT"),
        ("Hi.\n", ["--max-batch", "0"], "must be a positive integer"),
    ],
)
def test_bad_batches_are_one_line_and_exit_2(assets, tmp_path, capsys, content, extra, message):
    lines = tmp_path / "lines.txt"
    lines.write_text(content)
    status = _exit_status(["say", "--batch", str(lines), "-o", str(tmp_path / "out"), *_sources(assets), *extra])
    assert status == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error


def test_the_output_of_a_batch_is_a_folder(assets, tmp_path, capsys):
    lines = tmp_path / "lines.txt"
    lines.write_text("Hi.\n")
    (tmp_path / "taken.wav").write_bytes(b"")
    assert _exit_status(["say", "--batch", str(lines), "-o", str(tmp_path / "taken.wav"), *_sources(assets)]) == 2
    assert "-o names a folder" in capsys.readouterr().err


def test_say_help_tells_of_the_batch_mode(capsys):
    assert _exit_status(["say", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--batch FILE" in text and "--max-batch N" in text and "the folder for the files" in text
