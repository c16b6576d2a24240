"""csm.layouts: the one map between the original and transformers names is a bijection."""

import pytest
import torch

from csm.errors import CheckpointError
from csm.layouts import (
    from_rotate_half,
    is_linear,
    original_linear_name,
    original_name,
    qk_heads,
    to_rotate_half,
    transformers_linear_name,
    transformers_name,
)
from csm.model import CSM
from tests.factories.csm import tiny_config


def test_every_original_name_maps_to_transformers_and_back():
    config = tiny_config()
    with torch.device("meta"):
        names = list(CSM(config).state_dict())
    theirs = [transformers_name(name) for name in names]
    assert len(set(theirs)) == len(names)
    assert [original_name(name) for name in theirs] == names
    assert original_name("codec_model.encoder.layers.0.conv.weight") is None


def test_linear_names_are_those_lora_can_adapt():
    assert transformers_linear_name("decoder.layers.1.mlp.w1") == "depth_decoder.model.layers.1.mlp.gate_proj"
    assert original_linear_name("lm_head") == "codebook0_head"
    assert original_linear_name("embed_text_tokens") is None  # an embedding, not a linear
    assert original_linear_name("backbone_model.layers.0.input_layernorm") is None
    assert not is_linear("backbone.norm")
    with pytest.raises(CheckpointError):
        transformers_linear_name("backbone.layers.0.sa_norm")


def test_rotate_half_order_round_trips_and_pairs_rows():
    config = tiny_config()
    heads = qk_heads(config, "backbone.layers.0.attn.k_proj.weight")
    assert heads == config.backbone.num_kv_heads
    assert qk_heads(config, "backbone.layers.0.attn.v_proj") is None
    rows = torch.arange(heads * config.backbone.head_dim * 3.0).view(-1, 3)
    assert torch.equal(from_rotate_half(to_rotate_half(rows, heads), heads), rows)
    # Within a head, rotate-half order lists the even rows first, then the odd ones.
    half = config.backbone.head_dim // 2
    assert torch.equal(to_rotate_half(rows, heads)[:half], rows[: 2 * half : 2])
