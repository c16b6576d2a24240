"""PEFT adapters: ours load in PEFT + transformers and theirs in csm, with equal logits; merging."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from csm.adapters import load_adapter, save_adapter
from csm.errors import CheckpointError
from csm.finetune.batches import collate
from csm.finetune.lora import DEFAULT_TARGETS, HEAD_TARGETS, add_lora, apply_adapter, lora_weights
from csm.finetune.loss import loss_terms
from csm.finetune.merge import merge
from csm.loading import load_csm
from tests.factories.csm import random_state_dict, tiny_config, transformers_model, write_csm_checkpoint
from tests.finetune.test_loss_oracle import conversation, oracle_inputs

TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}
THEIR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture(scope="module")
def checkpoint(config, tmp_path_factory):
    return write_csm_checkpoint(tmp_path_factory.mktemp("base"), config, seed=0)


@pytest.fixture(scope="module")
def their_base(config):
    """transformers' CSM with the weights of `checkpoint`; tests take copies (PEFT edits it in place)."""
    return transformers_model(config, random_state_dict(config, 0))


@pytest.fixture(scope="module")
def batch(config):
    generator = torch.Generator().manual_seed(3)
    return collate([conversation(config, generator, 4)], ratio=1.0, generator=None)


def randomized(model, seed):
    """Give every LoRA B random values (a trained adapter; fresh ones are zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def our_outputs(model, batch):
    hidden = model.backbone(model.embed(batch.tokens, batch.mask), batch.positions)
    terms = loss_terms(model, batch)
    return model.codebook0_head(
        hidden
    ), terms.backbone_sum / terms.backbone_tokens + terms.decoder_sum / terms.decoder_tokens


def their_outputs(model, batch):
    embeddings, labels = oracle_inputs(model.base_model.model, batch)
    output = model(inputs_embeds=embeddings, labels=labels)
    return output.logits, output.loss


@torch.no_grad()
def test_our_adapter_loads_in_peft_with_equal_logits(checkpoint, their_base, batch, tmp_path):
    from peft import PeftModel

    ours = load_csm(checkpoint)
    add_lora(ours, DEFAULT_TARGETS + HEAD_TARGETS, rank=4, alpha=8)
    randomized(ours, seed=1)
    save_adapter(lora_weights(ours), ours.config, tmp_path, rank=4, alpha=8, base_model=str(checkpoint))
    theirs = PeftModel.from_pretrained(copy.deepcopy(their_base), tmp_path).eval()
    logits, loss = our_outputs(ours, batch)
    their_logits, their_loss = their_outputs(theirs, batch)
    torch.testing.assert_close(logits, their_logits, **TOLERANCE)
    torch.testing.assert_close(loss, their_loss, **TOLERANCE)


@torch.no_grad()
def test_a_peft_adapter_made_on_transformers_loads_merged_and_unmerged(config, checkpoint, their_base, batch, tmp_path):
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(
        copy.deepcopy(their_base),
        LoraConfig(r=4, lora_alpha=16, target_modules=THEIR_TARGETS),
    ).eval()
    randomized(theirs, seed=4)
    with torch.no_grad():  # as after training: the codec is never trained, its B stays zero
        for name, parameter in theirs.named_parameters():
            if "codec_model" in name and "lora_B" in name:
                parameter.zero_()
    theirs.save_pretrained(tmp_path)
    their_logits, their_loss = their_outputs(theirs, batch)

    merged = load_csm(checkpoint, adapter=tmp_path)
    logits, loss = our_outputs(merged, batch)
    torch.testing.assert_close(logits, their_logits, **TOLERANCE)
    torch.testing.assert_close(loss, their_loss, **TOLERANCE)

    unmerged = load_csm(checkpoint)
    add_lora(unmerged, DEFAULT_TARGETS, rank=4, alpha=16)
    apply_adapter(unmerged, load_adapter(tmp_path, config))
    unmerged_logits, unmerged_loss = our_outputs(unmerged, batch)
    torch.testing.assert_close(unmerged_logits, logits, **TOLERANCE)
    torch.testing.assert_close(unmerged_loss, loss, **TOLERANCE)

    written = merge(checkpoint, tmp_path, tmp_path / "original", layout="original")
    reloaded_logits, reloaded_loss = our_outputs(load_csm(written.parent), batch)
    torch.testing.assert_close(reloaded_logits, logits, **TOLERANCE)
    torch.testing.assert_close(reloaded_loss, loss, **TOLERANCE)

    # A transformers-layout base (its codec comes along) merged into transformers' layout loads
    # in transformers itself.
    from transformers import CsmForConditionalGeneration

    base = write_csm_checkpoint(tmp_path / "base", config, layout="transformers", seed=0)
    written = merge(base, tmp_path, tmp_path / "transformers", layout="transformers")
    reloaded = CsmForConditionalGeneration.from_pretrained(written.parent).eval()
    embeddings, labels = oracle_inputs(reloaded, batch)
    output = reloaded(inputs_embeds=embeddings, labels=labels)
    torch.testing.assert_close(output.logits, logits, **TOLERANCE)
    torch.testing.assert_close(output.loss, loss, **TOLERANCE)


def test_mismatched_adapters_name_the_modules(config, checkpoint, tmp_path):
    ours = load_csm(checkpoint)
    add_lora(ours, ["q_proj", "w2"], rank=2, alpha=2)
    randomized(ours, seed=2)
    save_adapter(lora_weights(ours), ours.config, tmp_path, rank=2, alpha=2, base_model=None)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.backbone_model.layers.1.mlp.down_proj.lora_B.weight"
    tensors[key] = torch.ones(tensors[key].shape[0] + 1, 2)
    tensors["base_model.model.backbone_model.layers.0.mlp.out_proj.lora_A.weight"] = torch.ones(2, 4)
    tensors["base_model.model.backbone_model.layers.0.mlp.out_proj.lora_B.weight"] = torch.ones(4, 2)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"modules CSM does not have: backbone_model\.layers\.0\.mlp\.out_proj"):
        load_csm(checkpoint, adapter=tmp_path)
    for name in [name for name in tensors if "out_proj" in name]:
        del tensors[name]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"does not fit the model: backbone\.layers\.1\.mlp\.w2 \(adapter 257x384"
    ):
        load_csm(checkpoint, adapter=tmp_path)
    settings = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**settings, "use_dora": True}))
    with pytest.raises(CheckpointError, match="settings csm does not support: use_dora"):
        load_csm(checkpoint, adapter=tmp_path)
