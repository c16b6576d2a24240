"""Training end to end on a tiny CSM: it learns, it resumes exactly, and the CLI runs it."""

import json

import pytest
import torch
from safetensors.torch import load_file

import csm
from csm.cli import main
from csm.errors import CheckpointError
from csm.finetune import trainer
from csm.finetune.codes import AudioFileCodeCache
from csm.generator import Generator
from csm.loading import load_for_generation
from csm.mimi import Mimi
from csm.text import audio_frames, load_tokenizer, text_frames
from tests.finetune.conftest import TEXTS, sources


def read_log(folder):
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def test_overfits_two_conversations_then_speaks_their_first_frames(assets, tmp_path):
    output = csm.finetune.train(
        assets.manifest,
        tmp_path / "out",
        **sources(assets),
        steps=30,
        lr=6e-3,
        warmup=0,
        lora_rank=32,
        decoder_frame_ratio=1.0,
        samples=0,
    )
    log = read_log(output)
    assert log[-1]["loss"] < 0.1 * log[0]["loss"]
    assert all(key in log[0] for key in ("backbone_loss", "decoder_loss", "lr", "tokens_per_second", "memory_mb"))

    model = load_for_generation(assets.model, adapter=output)
    tokenizer = load_tokenizer(model_source=assets.model)
    codes = AudioFileCodeCache(Mimi.from_pretrained(assets.mimi), assets.codes).codes(assets.clips / "clip1.wav")
    # The second conversation: clip1 said by speaker 0, no context.
    tokens, mask = text_frames(tokenizer, TEXTS[1], 0)
    model.setup_caches(1)
    positions = torch.arange(len(tokens))[None]
    frames = []
    for _ in range(2):
        frame = model.generate_frame(tokens[None], mask[None], positions, temperature=1.0, topk=1)
        frames.append(frame[0])
        tokens, mask = audio_frames(frame.t())
        tokens, mask, positions = tokens[:1], mask[:1], positions[:, -1:] + 1
    assert torch.equal(torch.stack(frames, dim=1), codes[:, :2])


def interrupt_at(monkeypatch, step):
    original = trainer._Trainer._step

    def step_or_interrupt(running):
        if running.position.step == step:
            raise KeyboardInterrupt
        return original(running)

    monkeypatch.setattr(trainer._Trainer, "_step", step_or_interrupt)


def test_ctrl_c_saves_a_checkpoint_that_resumes_bit_exactly(assets, tmp_path, monkeypatch):
    options = {
        **sources(assets),
        "steps": 5,
        "batch_frames": 30,
        "decoder_frame_ratio": 0.3,
        "lora_rank": 4,
        "samples": 0,
        "warmup": 2,
        "weight_decay": 0.01,
    }
    straight = csm.finetune.train(assets.manifest, tmp_path / "straight", **options)

    interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        csm.finetune.train(assets.manifest, tmp_path / "resumed", **options)
    monkeypatch.undo()
    resumed = csm.finetune.train(
        assets.manifest, tmp_path / "resumed", **options, resume=tmp_path / "resumed" / "checkpoint"
    )

    expected, got = load_file(straight / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert [record["loss"] for record in read_log(resumed)] == [record["loss"] for record in read_log(straight)]

    with pytest.raises(CheckpointError, match="other settings of batch_frames, seed"):
        csm.finetune.train(assets.manifest, tmp_path / "other", **{**options, "batch_frames": 40, "seed": 1},
                           resume=resumed / "checkpoint")  # fmt: skip


def cli_sources(assets) -> list[str]:
    return [
        *("--model", str(assets.model), "--mimi", str(assets.mimi), "--watermarker", str(assets.watermarker)),
        *("--device", "cpu"),
    ]


def test_cli_trains_evaluates_with_samples_and_speaks_with_the_adapter(assets, tmp_path, capsys):
    output = tmp_path / "out"
    options = ["--steps", "2", "--eval-split", "0.5", "--samples", "1", "--sample-seconds", "0.24", "--lora-rank", "2"]
    status = main(["finetune", str(assets.clips), "-o", str(output), *cli_sources(assets), *options,
                   "--cache-dir", str(assets.codes)])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    final = read_log(output)[-1]
    assert {"eval_loss", "eval_backbone_loss", "eval_decoder_loss", "end_of_speech_fraction"} <= final.keys()
    assert 0 <= final["end_of_speech_fraction"] <= 1
    assert [path.name for path in (output / "samples").glob("*.wav")] == ["step000002_0.wav"]
    assert json.loads((output / "adapter_config.json").read_text())["r"] == 2
    speech = tmp_path / "hello.wav"
    status = main(["say", "Hello.", "-o", str(speech), "--adapter", str(output), "--max-seconds", "0.16",
                   "--seed", "0", "--dtype", "float32", *cli_sources(assets)])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    assert speech.is_file()


def test_cli_data_errors_are_one_line(assets, tmp_path, capsys):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text('{"segments": [{"audio": "missing.wav", "text": "Hi", "speaker": 0}]}\n')
    status = main(["finetune", str(manifest), "-o", str(tmp_path / "out"), *cli_sources(assets),
                   "--cache-dir", str(assets.codes)])  # fmt: skip
    assert status == 2
    missing = tmp_path / "missing.wav"
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1] == f"csm: error: {manifest} line 1: segment 0: audio file {missing} does not exist"


def test_generator_samples_leave_the_model_cache_free(assets, tmp_path):
    from csm.finetune.evaluate import inference_caches

    model = load_for_generation(assets.model)
    with inference_caches(model):
        Generator(model, Mimi.from_pretrained(assets.mimi), load_tokenizer(model_source=assets.model))
        assert model.cache_rows == 1
    assert model.cache_rows == 0


def test_a_quantized_model_is_refused_with_what_to_do(assets, tmp_path, capsys):
    """Quantized (QLoRA-style) training is not supported: a `csm quantize` folder as the base
    model fails in one line that says what to do."""
    from csm.loading import load_csm
    from csm.quantized_checkpoint import save_quantized

    quantized = save_quantized(load_csm(assets.model), tmp_path / "int8", "int8", source=assets.model)
    status = main(["finetune", str(assets.clips), "-o", str(tmp_path / "out"), *cli_sources(assets),
                   "--model", str(quantized), "--cache-dir", str(assets.codes)])  # fmt: skip
    assert status == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "quantized training is not supported" in error and "use the unquantized model" in error
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_a_crash_while_a_checkpoint_is_replaced_loses_neither_the_old_nor_the_new(tmp_path, monkeypatch):
    from pathlib import Path

    from csm.finetune.resume import Position, load_checkpoint, save_checkpoint

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    folder, options, selection = tmp_path / "checkpoint", {"seed": 0}, torch.zeros(4)
    save_checkpoint(folder, model, optimizer, scheduler, selection, Position(step=1), options)
    old_weights = model.weight.detach().clone()

    with torch.no_grad():
        model.weight.add_(1.0)
    renames = []
    real_rename = Path.rename

    def crash_before_the_new_one_is_in(self, target):
        renames.append((self.name, Path(target).name))
        if self.name == ".checkpoint.tmp":
            raise OSError("killed")  # the process dies here
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_before_the_new_one_is_in)
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(folder, model, optimizer, scheduler, selection, Position(step=2), options)
    monkeypatch.undo()
    # The old one was moved aside first, the new one is complete beside it.
    assert renames == [("checkpoint", ".checkpoint.old"), (".checkpoint.tmp", "checkpoint")]
    assert (tmp_path / ".checkpoint.tmp" / "state.pt").is_file()

    _, position = load_checkpoint(folder, model, optimizer, scheduler, options)
    assert position.step == 1 and torch.equal(model.weight, old_weights)
    save_checkpoint(folder, model, optimizer, scheduler, selection, Position(step=3), options)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint"]
    assert load_checkpoint(folder, model, optimizer, scheduler, options)[1].step == 3
