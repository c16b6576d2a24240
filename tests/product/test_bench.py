"""`csm bench` end to end on the tiny model, `csm.bench` from Python, and its user errors."""

import pytest
import torch

from csm.bench import Mode, benchmark, default_modes, parse_modes, with_compiled
from csm.cli import main
from csm.quality import prompt_segments, teacher_forcing_sequence
from tests.product.test_cli import _csm, _exit_status


def _sources(assets) -> list[str]:
    return ["--model", str(assets.model), "--mimi", str(assets.mimi), "--device", "cpu"]


def _table(lines: list[str], title: str) -> dict[str, list[str]]:
    """The rows of the Markdown table after the line starting with `title`, by first cell."""
    start = next(index for index, line in enumerate(lines) if line.startswith(title)) + 1
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if set(cells[0]) != {"-"}:
            rows[cells[0]] = cells[1:]
    return rows


def test_bench_times_each_mode_and_scores_it_against_the_reference(assets):
    done = _csm("bench", "--frames", "2", "--quality", *_sources(assets))
    assert done.returncode == 0, done.stderr.decode()
    assert "frame" in done.stderr.decode()  # the progress bar
    lines = done.stdout.decode().splitlines()
    speed = _table(lines, "csm bench:")
    assert list(speed) == ["mode", "bf16", "int8", "int8-dynamic", "int4"]  # the default: all of them
    assert speed["mode"] == [
        "load s",
        "warm-up s",
        "first audio s",
        "s/frame",
        "real-time factor",
        "resident GB",
        "peak GB",
    ]
    for mode in ("bf16", "int8", "int8-dynamic", "int4"):
        first, per_frame, factor, resident, peak = (float(cell) for cell in speed[mode][2:])
        assert first > 0 and per_frame > 0 and factor == pytest.approx(per_frame / 0.08, abs=0.012)  # both rounded
        assert peak >= resident
    # The kernel of each bf16 weight shape of the one-row products, with every candidate's speed.
    kernels = _table(lines, "one-row kernels")
    assert kernels["products"][:2] == ["weight", "kernel"]
    labels = " / ".join(kernels)  # the tiny model's modules share shapes: one row per shape
    assert "backbone attn.qkv_proj" in labels and "decoder mlp.w13" in labels
    assert kernels["audio_head"][1] in ("mv", "linear")  # a row of its own: never packed
    for cells in list(kernels.values())[1:]:
        measured = {name: float(speed) for name, speed in zip(kernels["products"][2:], cells[2:]) if speed != "-"}
        assert cells[0].endswith("bfloat16") and cells[1] in measured and all(speed > 0 for speed in measured.values())
    quality = _table(lines, "quality against bf16")
    assert "teacher-forced on 5 frames of the built-in voices; fp32 is the noise floor" in "\n".join(lines)
    assert list(quality) == ["mode", "int8", "int8-dynamic", "int4", "fp32"]
    # The quantized modes stay near bf16, int8 nearer than int4 (KL from the mean column), and
    # weight-only int8 nearer than int8 with int8 activations too.
    kl = {mode: float(quality[mode][3]) for mode in ("int8", "int8-dynamic", "int4", "fp32")}
    assert 0 < kl["fp32"] < kl["int8"] < kl["int4"] < 0.1
    assert kl["int8"] < kl["int8-dynamic"] < 0.1
    per_codebook = _table(lines, "per codebook")
    assert list(per_codebook)[1:] == [str(codebook) for codebook in range(32)]


def test_quality_scores_the_reference_and_the_floor_even_when_only_other_modes_are_timed(assets, capsys):
    assert main(["bench", "--quantize", "int4", "--frames", "2", "--quality", *_sources(assets)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert list(_table(lines, "csm bench:"))[1:] == ["int4"]
    assert list(_table(lines, "quality against bf16"))[1:] == ["int4", "fp32"]


def test_compile_adds_each_modes_compiled_twin(assets, capsys):
    assert main(["bench", "--quantize", "fp32", "--compile", "--frames", "2", *_sources(assets)]) == 0
    assert list(_table(capsys.readouterr().out.splitlines(), "csm bench:"))[1:] == ["fp32", "fp32 compiled"]


def test_a_quantized_folder_runs_in_its_own_format_only(assets, tmp_path, capsys):
    folder = tmp_path / "int8"
    assert main(["quantize", str(assets.model), "-o", str(folder), "--to", "int8"]) == 0
    sources = ["--model", str(folder), "--mimi", str(assets.mimi), "--device", "cpu"]
    assert main(["bench", "--frames", "2", *sources]) == 0
    assert list(_table(capsys.readouterr().out.splitlines(), "csm bench:"))[1:] == ["int8"]
    # Both int8 modes run the same stored weights.
    assert main(["bench", "--frames", "2", "--quantize", "int8,int8-dynamic", *sources]) == 0
    assert list(_table(capsys.readouterr().out.splitlines(), "csm bench:"))[1:] == ["int8", "int8-dynamic"]
    for options in (["--quality"], ["--quantize", "bf16"]):
        assert main(["bench", *sources, *options]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and "holds int8 weights only" in error


def test_benchmark_from_python(assets, parts, mimi):
    sequence = teacher_forcing_sequence(parts[1], mimi, prompt_segments(assets.model)[0], frames=2)
    updates = []

    class Bar:
        def set_description(self, description):
            updates.append(description)

        def update(self, count):
            updates.append(count)

    result = benchmark(
        Mode(torch.float32),
        model=assets.model,
        mimi=mimi,
        tokenizer=parts[1],
        device=torch.device("cpu"),
        frames=2,
        sequence=sequence,
        progress=Bar(),
    )
    assert result.frames == 2 and result.logits.shape == (2, 32, 2051)
    assert 0 < result.first_audio_seconds and 0 < result.seconds_per_frame
    assert result.peak_bytes >= result.resident_bytes
    assert updates.count(1) == 2 + 2 + 2  # warm-up, timed and scored frames
    assert [text for text in updates if isinstance(text, str)] == [
        "fp32: loading",
        "fp32: warm-up",
        "fp32: streaming",
        "fp32: quality",
    ]


def test_modes_parse_from_their_names():
    assert parse_modes("bf16, FP32") == [Mode(torch.bfloat16), Mode(torch.float32)]
    # Quantized modes take bfloat16 activations, whatever --dtype says.
    assert parse_modes("int8,int4") == [Mode(torch.bfloat16, "int8"), Mode(torch.bfloat16, "int4")]
    assert [mode.name for mode in default_modes(torch.float32)] == ["fp32", "int8", "int8-dynamic", "int4"]
    compiled = with_compiled(parse_modes("fp32,fp16"))
    assert [mode.name for mode in compiled] == ["fp32", "fp32 compiled", "fp16", "fp16 compiled"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--quantize", "int9"], "unknown mode 'int9'"),
        (["--quantize", "bf16,bf16"], "named twice"),
        (["--quantize", ","], "no modes given"),
        (["--frames", "1"], "--frames must be at least 2"),
        (["--dtype", "float8"], "unknown dtype"),
        (["--model", "{tmp}/no-model"], "neither an existing file"),
    ],
)
def test_bench_user_errors_are_one_line_and_exit_2(assets, tmp_path, capsys, arguments, message):
    arguments = [argument.format(tmp=tmp_path) for argument in arguments]
    assert _exit_status(["bench", *_sources(assets), *arguments]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error


def test_bench_help_names_every_option(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["bench", "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--quantize",
        "--compile",
        "--frames",
        "--quality",
        "--model",
        "--mimi",
        "--tokenizer",
        "--device",
        "--dtype",
    ):
        assert option in text
    assert "--watermarker" not in text
