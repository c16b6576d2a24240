import json
import pickle
import shutil

import pytest
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_file

from csm.errors import CheckpointError, WeightsNotFoundError
from csm.llama import FLAVORS
from csm.loading import load_csm, load_for_generation
from csm.model import CSM, CSMConfig
from csm.transformers_config import config_from_transformers
from tests.factories.csm import random_state_dict, tiny_config, transformers_config, write_csm_checkpoint
from tests.factories.hub import populate_hub_cache


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture(scope="module")
def original_dir(config, tmp_path_factory):
    return write_csm_checkpoint(tmp_path_factory.mktemp("original"), config, layout="original", seed=3)


@pytest.fixture(scope="module")
def expected(config):
    return random_state_dict(config, seed=3)


def assert_weights_equal(model, expected):
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor.to(state[name].dtype)), name


def test_original_safetensors_folder_and_file(original_dir, config, expected):
    model = load_csm(original_dir)
    assert model.config == config
    assert_weights_equal(model, expected)
    assert_weights_equal(load_csm(original_dir / "model.safetensors"), expected)


@pytest.mark.parametrize("layout, shard", [("ckpt", None), ("transformers", None), ("transformers", "8MB")])
def test_every_layout_loads_the_same_weights(tmp_path, config, expected, layout, shard):
    folder = write_csm_checkpoint(tmp_path, config, layout=layout, seed=3, max_shard_size=shard)
    if shard:
        assert (folder / "model.safetensors.index.json").is_file()
    model = load_csm(folder)
    assert model.config == config
    assert_weights_equal(model, expected)


def test_loads_into_the_requested_dtype(original_dir, expected):
    model = load_csm(original_dir, dtype=torch.bfloat16, device="cpu")
    assert {tensor.dtype for tensor in model.state_dict().values()} == {torch.bfloat16}
    assert_weights_equal(model, expected)
    assert not any(parameter.requires_grad for parameter in model.parameters())


def test_offline_from_the_hub_cache(monkeypatch, tmp_path, original_dir, expected):
    files = {name: original_dir / name for name in ("model.safetensors", "config.json")}
    populate_hub_cache(tmp_path, "sesame/csm-1b", files)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_weights_equal(load_csm("sesame/csm-1b"), expected)


def test_stray_causal_masks_are_ignored(tmp_path, config, expected):
    save_file({**expected, "backbone_causal_mask": torch.ones(4, 4, dtype=torch.bool)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    assert_weights_equal(load_csm(tmp_path), expected)


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, config, expected):
    broken = dict(expected)
    del broken["projection.weight"]
    broken["extra.weight"] = torch.zeros(2)
    broken["codebook0_head.weight"] = torch.zeros(7, 3)
    save_file(broken, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    with pytest.raises(CheckpointError) as caught:
        load_for_generation(tmp_path)
    message = str(caught.value)
    assert "missing keys: projection.weight" in message
    assert "unexpected keys: extra.weight" in message
    assert "codebook0_head.weight (7, 3) (expected (2051, 256))" in message


def test_a_truncated_file_says_so(tmp_path, original_dir):
    data = (original_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    shutil.copy(original_dir / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match="truncated"):
        load_for_generation(tmp_path)


def test_a_truncated_ckpt_says_so(tmp_path, config):
    folder = write_csm_checkpoint(tmp_path, config, layout="ckpt")
    data = (folder / "ckpt.pt").read_bytes()
    (folder / "ckpt.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="ckpt.pt"):
        load_for_generation(folder)


@pytest.mark.parametrize("content", [b"hello, I am not a checkpoint", b"", json.dumps({"a": 1}).encode()])
def test_a_file_that_is_no_checkpoint(tmp_path, content):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_for_generation(tmp_path / "model.safetensors")


def test_safetensors_without_csm_keys(tmp_path):
    save_file({"encoder.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a CSM checkpoint"):
        load_for_generation(tmp_path)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_ckpt_with_arbitrary_objects_is_never_unpickled(tmp_path, capsys):
    torch.save({"model": Payload()}, tmp_path / "ckpt.pt", pickle_module=pickle)
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_for_generation(tmp_path)
    assert "must never run" not in capsys.readouterr().out


def test_a_ckpt_that_is_no_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="plain state dict"):
        load_for_generation(tmp_path)


def test_unknown_flavor_name(tmp_path, original_dir):
    shutil.copy(original_dir / "model.safetensors", tmp_path)
    fields = {**CSMConfig().to_dict(), "backbone_flavor": "llama-7B"}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    with pytest.raises(CheckpointError, match="unknown model flavor 'llama-7B'; known flavors: llama-1B, llama-100M"):
        load_for_generation(tmp_path)


def test_original_config_round_trips():
    assert CSMConfig().to_dict() == {
        "audio_num_codebooks": 32,
        "audio_vocab_size": 2051,
        "backbone_flavor": "llama-1B",
        "decoder_flavor": "llama-100M",
        "text_vocab_size": 128256,
    }
    tiny = tiny_config()
    assert CSMConfig.from_dict(json.loads(json.dumps(tiny.to_dict()))) == tiny


def test_transformers_config_of_csm_1b_maps_to_the_named_flavors():
    fields = transformers_config(CSMConfig()).to_dict()
    assert config_from_transformers(fields) == CSMConfig()
    # transformers 4.x wrote the RoPE settings as rope_theta + rope_scaling.
    legacy = {**fields, "rope_theta": 500000.0, "rope_scaling": fields.pop("rope_parameters")}
    assert config_from_transformers(legacy).backbone == FLAVORS["llama-1B"]


def test_offline_and_not_cached_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="not in the local cache and HF_HUB_OFFLINE is set"):
        load_for_generation("sesame/csm-1b")


def test_csm_1b_has_the_published_keys_and_shapes():
    with torch.device("meta"):
        state = CSM(CSMConfig()).state_dict()
    assert len(state) == 187
    assert sum(tensor.numel() for tensor in state.values()) == 1_552_791_552
    published = {
        "audio_head": (31, 1024, 2051),
        "backbone.layers.15.attn.k_proj.weight": (512, 2048),
        "backbone.layers.0.attn.output_proj.weight": (2048, 2048),
        "backbone.layers.3.mlp.w2.weight": (2048, 8192),
        "backbone.norm.scale": (2048,),
        "decoder.layers.3.attn.v_proj.weight": (256, 1024),
        "decoder.layers.0.mlp_norm.scale": (1024,),
        "text_embeddings.weight": (128256, 2048),
        "audio_embeddings.weight": (65632, 2048),
        "projection.weight": (1024, 2048),
        "codebook0_head.weight": (2051, 2048),
    }
    for name, shape in published.items():
        assert tuple(state[name].shape) == shape, name


def test_a_missing_shard_is_named(tmp_path, config):
    folder = write_csm_checkpoint(tmp_path, config, layout="transformers", max_shard_size="8MB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = max(index["weight_map"].values())
    (folder / shard).unlink()
    with pytest.raises(CheckpointError, match=f"lists the shard {shard}, which is not beside it"):
        load_for_generation(folder)
