"""Shared Mimi models for the tests: built once per session, all on random weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from csm.mimi import Mimi, MimiConfig
from csm.mimi.loading import read_weights
from tests.factories.mimi import transformers_to_moshi, write_moshi_checkpoint

# A small Mimi that keeps what matters for exactness: the real strides (1920 samples per
# frame), head_dim 64, the 250-step window and 2048-entry codebooks.
TINY = MimiConfig(num_filters=8, dim=128, num_layers=2, num_heads=2, ffn_dim=256, codebook_dim=32, num_codebooks=8)


def tiny_transformers_config():
    from transformers import MimiConfig as HFMimiConfig

    return HFMimiConfig(
        num_filters=8,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=256,
        codebook_dim=32,
        vector_quantization_hidden_dimension=32,
        num_quantizers=8,
        upsample_groups=128,
    )


def random_reference(config, seed: int):
    """A transformers MimiModel with random weights; its codebooks get distinct random
    entries (the default ones are all equal), so nearest-entry ties are rare, and its layer
    scales are raised from 0.01 so that attention (and its window) visibly shapes the output."""
    from transformers import MimiModel

    torch.manual_seed(seed)
    model = MimiModel(config).eval()
    with torch.no_grad():
        quantizer = model.quantizer
        for group in (
            quantizer.semantic_residual_vector_quantizer,
            quantizer.acoustic_residual_vector_quantizer,
        ):
            for layer in group.layers:
                layer.codebook.embed_sum.normal_()
                layer.codebook.cluster_usage.uniform_(0.5, 2.0)
        for name, parameter in model.named_parameters():
            if name.endswith("layer_scale.scale"):
                parameter.uniform_(0.2, 0.5)
    return model


@pytest.fixture(scope="session")
def reference_pair(tmp_path_factory):
    """(transformers MimiModel in the real config, our Mimi loaded from the same weights
    converted by this test into a moshi-layout file)."""
    from transformers import MimiConfig as HFMimiConfig

    reference = random_reference(HFMimiConfig(), seed=0)
    folder = tmp_path_factory.mktemp("mimi_reference")
    reference.save_pretrained(folder)
    moshi_file = folder / "moshi.safetensors"
    save_file(transformers_to_moshi(load_file(folder / "model.safetensors")), moshi_file)
    return reference, Mimi.from_pretrained(moshi_file)


@pytest.fixture(scope="session")
def tiny_reference_pair(tmp_path_factory):
    """(tiny transformers MimiModel, our tiny Mimi loaded from its saved transformers layout)."""
    reference = random_reference(tiny_transformers_config(), seed=1)
    folder = tmp_path_factory.mktemp("mimi_tiny_reference")
    reference.save_pretrained(folder)
    ours = Mimi(TINY).eval()
    ours.load_state_dict(read_weights(folder / "model.safetensors"))
    return reference, ours


@pytest.fixture(scope="session")
def moshi_checkpoint(tmp_path_factory):
    return write_moshi_checkpoint(tmp_path_factory.mktemp("mimi_moshi"), seed=0)


@pytest.fixture(scope="session")
def mimi(moshi_checkpoint):
    return Mimi.from_pretrained(moshi_checkpoint)
