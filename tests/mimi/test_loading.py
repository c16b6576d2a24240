"""Loading Mimi from every published layout, and clear errors for what is not Mimi."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from csm.errors import CheckpointError, WeightsNotFoundError
from csm.mimi import Mimi
from tests.factories.mimi import (
    MOSHI_FILE,
    moshi_to_transformers,
    random_moshi_state_dict,
    write_transformers_checkpoint,
)


def assert_same_weights(a: Mimi, b: Mimi) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


def test_moshi_and_transformers_layouts_load_the_same_model(tmp_path, mimi):
    write_transformers_checkpoint(tmp_path / "mimi", seed=0)
    from_transformers = Mimi.from_pretrained(tmp_path / "mimi")
    assert_same_weights(from_transformers, mimi)
    codes = torch.randint(0, 2048, (1, 32, 2), generator=torch.Generator().manual_seed(0))
    assert torch.equal(from_transformers.decode(codes), mimi.decode(codes))


def test_folder_with_the_official_file_name(tmp_path, moshi_checkpoint, mimi):
    (tmp_path / MOSHI_FILE).symlink_to(moshi_checkpoint)
    assert_same_weights(Mimi.from_pretrained(tmp_path), mimi)


def test_codec_inside_a_transformers_csm_checkpoint(tmp_path, mimi):
    state = {
        f"codec_model.{name}": tensor for name, tensor in moshi_to_transformers(random_moshi_state_dict(0)).items()
    }
    state["backbone_model.norm.weight"] = torch.ones(8)
    save_file(state, tmp_path / "model.safetensors")
    assert_same_weights(Mimi.from_pretrained(tmp_path), mimi)


def test_sharded_csm_checkpoint_reads_only_the_codec_shard(tmp_path, mimi):
    codec = {f"codec_model.{name}": t for name, t in moshi_to_transformers(random_moshi_state_dict(0)).items()}
    save_file(codec, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {name: "model-00002-of-00002.safetensors" for name in codec}
    weight_map["backbone_model.norm.weight"] = "model-00001-of-00002.safetensors"  # never opened
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    # An original-layout CSM file beside the shards has no codec: the index wins.
    save_file({"backbone.layers.0.attn.q_proj.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    assert_same_weights(Mimi.from_pretrained(tmp_path), mimi)


def test_dtype_and_device(moshi_checkpoint, mimi):
    half = Mimi.from_pretrained(moshi_checkpoint, dtype=torch.bfloat16, device="cpu")
    for name, tensor in half.state_dict().items():
        assert tensor.dtype == torch.bfloat16 and tensor.device.type == "cpu", name
        assert torch.allclose(tensor.float(), mimi.state_dict()[name], rtol=1e-2, atol=1e-6), name


def broken_checkpoint(tmp_path, edit) -> str:
    state = random_moshi_state_dict(0)
    edit(state)
    path = tmp_path / "broken.safetensors"
    save_file(state, path)
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("decoder.model.14.conv.conv.bias"), "missing keys: decoder.layers.14.bias"),
        (lambda s: s.update(extra=torch.zeros(1)), "unexpected keys: extra"),
        (
            lambda s: s.update({"downsample.conv.conv.conv.weight": torch.zeros(512, 512, 3)}),
            r"mis-shaped keys: downsample.weight \(512, 512, 3\) \(expected \(512, 512, 4\)\)",
        ),
        (
            lambda s: s.pop("quantizer.rvq_rest.vq.layers.3._codebook.cluster_usage"),
            "quantizer.acoustic: incomplete codebooks",
        ),
    ],
    ids=["missing", "unexpected", "mis-shaped", "incomplete-codebook"],
)
def test_checkpoint_errors_name_the_keys(tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        Mimi.from_pretrained(broken_checkpoint(tmp_path, edit))


def test_a_file_without_mimi(tmp_path):
    save_file({"backbone.layers.0.attn.q_proj.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="holds no Mimi weights"):
        Mimi.from_pretrained(tmp_path)


def test_a_file_that_is_not_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Mimi.from_pretrained(path)


def test_a_folder_without_weights(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=MOSHI_FILE):
        Mimi.from_pretrained(tmp_path)


def test_default_repo_from_the_offline_hub_cache(monkeypatch, tmp_path, moshi_checkpoint, mimi):
    from huggingface_hub import constants as hub_constants

    commit = "0" * 40
    repo = tmp_path / "models--kyutai--moshiko-pytorch-bf16"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / MOSHI_FILE).symlink_to(moshi_checkpoint)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    assert_same_weights(Mimi.from_pretrained(), mimi)


def test_bf16_file_like_the_official_one(tmp_path, mimi):
    # kyutai/moshiko-pytorch-bf16 stores bf16; loading gives fp32 weights of the rounded values.
    state = {name: tensor.to(torch.bfloat16) for name, tensor in random_moshi_state_dict(0).items()}
    save_file(state, tmp_path / MOSHI_FILE)
    loaded = Mimi.from_pretrained(tmp_path).state_dict()
    expected = mimi.state_dict()
    for name, tensor in loaded.items():
        assert tensor.dtype == torch.float32, name
        assert torch.allclose(tensor, expected[name], rtol=2e-2, atol=1e-6), name
    first = state["decoder.model.0.conv.conv.weight"].float()
    assert torch.equal(loaded["decoder.layers.0.weight"], first)
