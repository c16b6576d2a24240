"""Quantized checkpoint folders: written by `csm quantize`, read by the usual loaders, bad ones rejected."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import load_file, save_file

from csm.errors import CheckpointError
from csm.int8_dynamic import DynamicInt8Linear
from csm.loading import load_csm, load_for_generation
from csm.quantized_checkpoint import save_quantized
from tests.csm.test_inference import frames
from tests.csm.test_model import text_prompt
from tests.factories.csm import tiny_config, write_csm_checkpoint
from tests.factories.hub import populate_hub_cache


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    folder = write_csm_checkpoint(tmp_path_factory.mktemp("original"), tiny_config(), seed=6)
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request, original, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    save_quantized(load_csm(original, dtype=torch.bfloat16), folder, request.param, source=original)
    return request.param, folder


def test_a_folder_loads_as_quantizing_at_load_does(original, quantized):
    format, folder = quantized
    assert json.loads((folder / "config.json").read_text())["quantization"]["format"] == format
    assert (folder / "tokenizer.json").is_file()
    stored = load_file(folder / "model.safetensors")
    assert stored["backbone.layers.0.attn.q_proj.qweight"].dtype == (torch.int8 if format == "int8" else torch.uint8)
    assert stored["audio_head"].dtype == torch.bfloat16 and "audio_head" in stored
    prompt = [text_prompt(5, seed=1)]
    loaded = frames(load_for_generation(folder), prompt)
    assert torch.equal(loaded, frames(load_for_generation(original, quantize=format), prompt))
    assert torch.equal(frames(load_for_generation(folder, quantize=format), prompt), loaded)


def test_an_int8_folder_runs_as_int8_dynamic_too(original, quantized):
    """One folder serves both int8 modes: the same stored weights, the products chosen at load."""
    format, folder = quantized
    if format != "int8":
        with pytest.raises(ValueError, match="load it with quantize=None or 'int4'"):
            load_for_generation(folder, quantize="int8-dynamic")
        return
    model = load_for_generation(folder, quantize="int8-dynamic")
    assert isinstance(model.decoder.layers[0].mlp.w2, DynamicInt8Linear)
    assert isinstance(model.backbone.layers[1].attn.qkv_proj.linear, DynamicInt8Linear)
    # Two rows at once, as the engine runs them; equal to quantizing the original at load.
    prompts = [text_prompt(5, seed=1), text_prompt(5, seed=2)]
    loaded = frames(model, prompts)
    assert loaded.shape[0] == 2
    assert torch.equal(loaded, frames(load_for_generation(original, quantize="int8-dynamic"), prompts))


def test_the_embedding_tables_stay_in_the_file(quantized):
    """Mapped, not read: only the rows a step gathers become resident."""
    _, folder = quantized
    model = load_for_generation(folder)
    path = str((folder / "model.safetensors").resolve())
    regions = [
        [int(bound, 16) for bound in line.split()[0].split("-")]
        for line in Path("/proc/self/maps").read_text().splitlines()
        if line.endswith(path)
    ]
    stored = load_file(folder / "model.safetensors")
    for name in ("text_embeddings", "audio_embeddings"):
        table = getattr(model, name).weight
        assert any(start <= table.data_ptr() < end for start, end in regions), name
        assert torch.equal(table, stored[f"{name}.weight"])


def test_a_folder_is_a_quarter_or_an_eighth_of_the_fp32_one(original, quantized):
    format, folder = quantized
    linears = sum(
        tensor.numel() for name, tensor in load_file(original / "model.safetensors").items() if "layers" in name
    )
    stored = load_file(folder / "model.safetensors")
    quantized_bytes = sum(tensor.numel() * tensor.element_size() for name, tensor in stored.items() if "layers" in name)
    # Codes plus bf16 scales (and zeros): ~1 byte a weight for int8, ~0.56 for int4 in groups of 64.
    assert quantized_bytes < linears * (1.05 if format == "int8" else 0.6)


def test_offline_from_the_hub_cache(monkeypatch, tmp_path, quantized):
    format, folder = quantized
    populate_hub_cache(
        tmp_path, "someone/csm-1b-q", {name: folder / name for name in ("model.safetensors", "config.json")}
    )
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_for_generation("someone/csm-1b-q")
    assert model.decoder.layers[0].mlp.w2.format == format


def test_a_folder_is_loaded_only_as_what_it_is(quantized):
    format, folder = quantized
    others = ["int4"] if format == "int8" else ["int8", "int8-dynamic"]
    for other in others:
        with pytest.raises(ValueError, match=f"is quantized to {format}"):
            load_for_generation(folder, quantize=other)
    with pytest.raises(ValueError, match=f"is quantized to {format}"):
        load_for_generation(folder, dtype=torch.float32)
    with pytest.raises(CheckpointError, match="has no plain weights"):
        load_csm(folder)


def broken_copy(folder, tmp_path, change_tensors=None, change_config=None):
    shutil.copytree(folder, tmp_path / "broken")
    broken = tmp_path / "broken"
    if change_tensors:
        tensors = load_file(broken / "model.safetensors")
        change_tensors(tensors)
        save_file(tensors, broken / "model.safetensors")
    if change_config:
        config = json.loads((broken / "config.json").read_text())
        change_config(config)
        (broken / "config.json").write_text(json.dumps(config))
    return broken


def test_bad_files_are_named(tmp_path, quantized):
    format, folder = quantized
    name = "decoder.layers.1.mlp.w2"

    def drop_scales(tensors):
        del tensors[f"{name}.scales"]

    with pytest.raises(CheckpointError, match=f"missing keys: {name}.scales"):
        load_for_generation(broken_copy(folder, tmp_path / "a", change_tensors=drop_scales))

    def wrong_dtype(tensors):
        tensors[f"{name}.qweight"] = tensors[f"{name}.qweight"].to(torch.int16)

    with pytest.raises(CheckpointError, match=f"{name}.qweight is torch.int16"):
        load_for_generation(broken_copy(folder, tmp_path / "b", change_tensors=wrong_dtype))

    def other_format(config):
        config["quantization"]["format"] = "int8" if format == "int4" else "int4"
        config["quantization"]["group_size"] = 64

    with pytest.raises(CheckpointError, match="does not fit its int"):
        load_for_generation(broken_copy(folder, tmp_path / "c", change_config=other_format))

    def unknown_format(config):
        config["quantization"] = {"format": "nf4"}

    with pytest.raises(CheckpointError, match="unknown quantization"):
        load_for_generation(broken_copy(folder, tmp_path / "d", change_config=unknown_format))

    data = (folder / "model.safetensors").read_bytes()
    truncated = broken_copy(folder, tmp_path / "e")
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_for_generation(truncated)
