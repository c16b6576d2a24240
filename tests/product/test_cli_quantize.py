"""`csm quantize`, and a quantized folder or `--quantize` through `csm say`, in-process."""

import json

import pytest
import soundfile

from csm.cli import main

FRAME = 1920


def _say(assets, tmp_path, *options: str) -> int:
    output = tmp_path / "out.wav"
    status = main(
        [
            "say",
            "Hi.",
            "-o",
            str(output),
            "--seed",
            "1",
            "--max-seconds",
            "0.16",
            "--no-watermark",
            "--mimi",
            str(assets.mimi),
            "--device",
            "cpu",
            *options,
        ]
    )
    assert status == 0
    return soundfile.info(str(output)).frames


def test_quantize_writes_a_folder_that_say_uses_offline(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "csm-1b-int4"
    assert main(["quantize", str(assets.model), "-o", str(folder), "--to", "int4"]) == 0
    assert "int4 weights" in capsys.readouterr().err
    assert json.loads((folder / "config.json").read_text())["quantization"]["format"] == "int4"
    assert (folder / "tokenizer.json").is_file() and (folder / "prompts" / "conversational_a.wav").is_file()
    assert _say(assets, tmp_path, "--model", str(folder)) == 2 * FRAME
    assert _say(assets, tmp_path, "--model", str(assets.model), "--quantize", "int8") == 2 * FRAME


def test_an_int8_folder_says_in_both_int8_modes(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "csm-1b-int8"
    assert main(["quantize", str(assets.model), "-o", str(folder), "--to", "int8"]) == 0
    for mode in ("int8", "int8-dynamic"):
        assert _say(assets, tmp_path, "--model", str(folder), "--quantize", mode) == 2 * FRAME


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["quantize", "{model}", "-o", "{tmp}", "--to", "int8"], "is not empty: choose a new folder"),
        (["quantize", "{tmp}/none", "-o", "{tmp}/q", "--to", "int8"], "neither an existing file"),
        (
            ["say", "Hi.", "-o", "{tmp}/a.wav", "--model", "{model}", "--quantize", "int8", "--dtype", "float32"],
            "runs in bfloat16, not float32",
        ),
    ],
)
def test_quantize_errors_are_one_line(assets, tmp_path, capsys, arguments, message):
    (tmp_path / "file").write_text("")
    status = main([argument.format(tmp=tmp_path, model=assets.model) for argument in arguments])
    assert status == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]
