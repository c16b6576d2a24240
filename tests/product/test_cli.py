"""The `csm` command: each subcommand once in a subprocess, and every user error as one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from csm.audio import read_audio, save_audio
from csm.cli import main
from tests.product.conftest import speech_like

FRAME = 1920


def _sources(assets) -> list[str]:
    return [
        "--model",
        str(assets.model),
        "--mimi",
        str(assets.mimi),
        "--watermarker",
        str(assets.watermarker),
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]


def _exit_status(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit:  # argparse's usage errors
        return exit.code


def _csm(*args: str, stdin: str | None = None, **environment: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "import sys; from csm.cli import main; sys.exit(main())", *args]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **environment}
    return subprocess.run(
        command, input=stdin.encode() if stdin else None, capture_output=True, env=environment, timeout=300, check=False
    )


def test_say_writes_a_readable_file_and_one_summary_line(assets, tmp_path):
    output = tmp_path / "out.wav"
    done = _csm(
        "say",
        "Hello there. How are you?",
        "-o",
        str(output),
        "--seed",
        "1",
        "--max-seconds",
        "0.24",
        "--voice",
        "conversational_a",
        "--context",
        str(assets.voice_audio),
        "Some words.",
        "--context-speaker",
        "1",
        *_sources(assets),
    )
    assert done.returncode == 0, done.stderr.decode()
    info = soundfile.info(str(output))
    assert (info.samplerate, info.channels, info.frames) == (24_000, 1, 3 * FRAME)
    summary = done.stderr.decode().strip().splitlines()[-1]
    assert summary.startswith(f"{output}: 0.24 s of audio in ") and "real-time factor" in summary
    assert "frame" in done.stderr.decode()  # the progress bar counts frames


def test_say_streams_raw_pcm_of_text_from_stdin(assets):
    done = _csm("say", "-o", "-", "--stream", "--no-watermark", "--max-seconds", "0.16", *_sources(assets), stdin="Hi.")
    assert done.returncode == 0, done.stderr.decode()
    assert len(done.stdout) == 2 * FRAME * 2
    assert np.abs(np.frombuffer(done.stdout, dtype="<i2")).max() > 0


def test_converse_renders_the_turns_after_their_prompts(assets, tmp_path):
    script = tmp_path / "script.json"
    save_audio(tmp_path / "b.wav", speech_like(0.3, seed=9), 24_000)
    script.write_text(
        json.dumps(
            {
                "prompts": {"0": "conversational_b", "1": {"audio": "b.wav", "text": "What b says."}},
                "turns": [{"speaker": 0, "text": "Hey how are you doing?"}, {"speaker": 1, "text": "Pretty good."}],
            }
        )
    )
    output = tmp_path / "conversation.flac"
    done = _csm("converse", str(script), "-o", str(output), "--seed", "2", "--max-seconds", "0.16", *_sources(assets))
    assert done.returncode == 0, done.stderr.decode()
    audio, rate = read_audio(output)
    assert rate == 24_000 and audio.numel() == 2 * 2 * FRAME


def test_info_shows_versions_device_and_where_each_artifact_is(assets):
    done = _csm(
        "info",
        "--model",
        str(assets.model),
        "--mimi",
        str(assets.mimi),
        "--watermarker",
        str(assets.watermarker),
        "--device",
        "cpu",
    )
    assert done.returncode == 0, done.stderr.decode()
    text = done.stdout.decode()
    assert "torch " in text and "device: cpu, CSM dtype: bfloat16" in text
    assert f"CSM weights: {assets.model}: cached at {assets.model / 'model.safetensors'}" in text
    assert f"Mimi weights: {assets.mimi}: cached at {assets.mimi}" in text
    assert f"voice conversational_a: {assets.model}: cached at" in text


def test_weights_not_in_an_offline_cache_say_how_to_get_them(tmp_path):
    done = _csm("say", "Hi.", "-o", str(tmp_path / "a.wav"), "--model", "sesame/csm-1b", HF_HOME=str(tmp_path / "hf"))
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "not in the local cache" in lines[0] and "HF_TOKEN" in lines[0]


def test_help_is_complete(capsys):
    for command in ([], ["say"], ["converse"], ["watermark"], ["watermark", "check"], ["info"]):
        with pytest.raises(SystemExit) as exit:
            main([*command, "--help"])
        assert exit.value.code == 0
    text = capsys.readouterr().out
    for option in ("--context-speaker", "--voice", "--stream", "--no-watermark", "--max-seconds", "--tokenizer"):
        assert option in text


@pytest.fixture
def bad_audio(tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF0000WAVE" + bytes(40))
    nan = tmp_path / "nan.wav"
    soundfile.write(nan, np.array([0.0, np.nan], dtype=np.float32), 24_000, subtype="FLOAT")
    long = tmp_path / "long.wav"
    save_audio(long, speech_like(75.0), 24_000)
    return {"corrupt": corrupt, "nan": nan, "long": long}


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["say", "", "-o", "{tmp}/a.wav"], "the text to say is empty"),
        (["say", "Hi.", "-o", "{tmp}/a.mp4"], "cannot tell the audio format"),
        (["say", "Hi.", "-o", "{tmp}/missing/a.wav"], "does not exist"),
        (["say", "Hi.", "-o", "{tmp}/a.wav", "--speaker", "-1"], "speaker must be a non-negative integer"),
        (["say", "Hi.", "-o", "{tmp}/a.wav", "--speaker", "one"], "speaker must be a non-negative integer"),
        (["say", "Hi.", "-o", "{tmp}/a.wav", "--max-seconds", "0"], "--max-seconds must be positive"),
        (["say", "Hi.", "-o", "{tmp}/a.wav", "--context-speaker", "1"], "must follow the --context"),
        (["say", "Hi.", "-o", "{tmp}/a.wav", "--stream"], "use it with -o -"),
        (["say", "Hi.", "-o", "{tmp}/a.wav", "--context", "{corrupt}", "words"], "cannot read audio file"),
        (["say", "Hi.", "-o", "{tmp}/a.wav", "--context", "{tmp}/none.wav", "words"], "does not exist"),
        (["say", "Hi.", "-o", "{tmp}/a.wav", "--context", "{nan}", "words"], "NaN or infinite"),
        (["say", "Hi.", "-o", "{tmp}/a.wav", "--model", "{tmp}/no-model"], "neither an existing file"),
        (
            ["say", "Hi.", "-o", "{tmp}/a.wav", "--context", "{long}", "words", "--max-seconds", "90"],
            "context too long",
        ),
        (["converse", "{tmp}/none.json", "-o", "{tmp}/a.wav"], "does not exist"),
        (["watermark", "check", "{tmp}/none.wav"], "does not exist"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(assets, bad_audio, tmp_path, capsys, arguments, message):
    command, *rest = [argument.format(tmp=tmp_path, **bad_audio) for argument in arguments]
    sources = ["--watermarker", str(assets.watermarker)] if command == "watermark" else _sources(assets)
    # Options given later win, so a case may override a source.
    assert _exit_status([command, *sources, *rest] if command != "watermark" else [command, *rest, *sources]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error


@pytest.mark.parametrize(
    "script, message",
    [
        ("not json", "is not valid JSON"),
        (json.dumps({"turns": []}), 'non-empty list "turns"'),
        (json.dumps({"turns": [{"speaker": -1, "text": "x"}]}), "turns[0].speaker must be"),
        (json.dumps({"turns": [{"speaker": 0, "text": ""}]}), "turns[0].text must be"),
        (json.dumps({"turns": [{"speaker": 0, "text": "x"}], "prompts": {"0": "nobody"}}), "unknown voice"),
    ],
)
def test_bad_conversation_scripts_are_one_line(assets, tmp_path, capsys, script, message):
    path = tmp_path / "script.json"
    path.write_text(script)
    assert _exit_status(["converse", str(path), "-o", str(tmp_path / "out.wav"), *_sources(assets)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error
