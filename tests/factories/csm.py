"""Random-weight CSM checkpoints in the published layouts, for tests of any part of csm.

    config = tiny_config()
    folder = write_csm_checkpoint(tmp_path / "csm", config, layout="original", seed=0)
    model = load_for_generation(folder)

Layouts: "original" (model.safetensors + config.json), "ckpt" (ckpt.pt + config.json) and
"transformers" (what `CsmForConditionalGeneration.save_pretrained` writes, with a tiny Mimi as
its codec). The transformers layout is written by transformers itself (a test-only oracle).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from csm.llama import LlamaConfig
from csm.model import CSM, CSMConfig

# The tiny tokenizer (tests/factories/tokenizer.py) keeps its ids below this.
TINY_TEXT_VOCAB = 512


def tiny_config() -> CSMConfig:
    """A small CSM that keeps what matters for exactness: the real head dims (64 and 128),
    grouped-query attention, 32 codebooks of 2051 entries and CSM-1B's RoPE parameters."""
    backbone = LlamaConfig(num_layers=2, dim=256, num_heads=4, num_kv_heads=2, head_dim=64, ffn_dim=384)
    decoder = LlamaConfig(num_layers=2, dim=256, num_heads=2, num_kv_heads=1, head_dim=128, ffn_dim=384)
    return CSMConfig(backbone_flavor=backbone, decoder_flavor=decoder, text_vocab_size=TINY_TEXT_VOCAB)


def random_state_dict(config: CSMConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Original-layout weights, scaled so that activations stay O(1) through the network."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in CSM(config).state_dict().items()}
    state = {}
    for name, shape in shapes.items():
        if name.endswith(".scale"):
            state[name] = 1 + 0.1 * torch.randn(shape, generator=generator)
        elif name.endswith("embeddings.weight"):
            state[name] = torch.randn(shape, generator=generator)
        else:
            fan_in = shape[-2] if name == "audio_head" else shape[-1]
            state[name] = torch.randn(shape, generator=generator) / fan_in**0.5
    return state


def random_model(config: CSMConfig, seed: int = 0) -> CSM:
    model = CSM(config)
    model.load_state_dict(random_state_dict(config, seed))
    return model.eval().requires_grad_(False)


def write_csm_checkpoint(
    directory: Path, config: CSMConfig, layout: str = "original", seed: int = 0, *, max_shard_size: str | None = None
) -> Path:
    """Write random weights of `config` in `layout` into `directory`; returns the directory.

    `max_shard_size` (transformers layout only, e.g. "20MB") writes sharded safetensors with
    their `model.safetensors.index.json`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = random_state_dict(config, seed)
    if layout == "transformers":
        model = transformers_model(config, state)
        model.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
        return directory
    (directory / "config.json").write_text(json.dumps(config.to_dict()))
    if layout == "original":
        save_file(state, directory / "model.safetensors")
    elif layout == "ckpt":
        torch.save(state, directory / "ckpt.pt")
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return directory


def transformers_model(config: CSMConfig, state: dict[str, torch.Tensor]):
    """transformers' `CsmForConditionalGeneration` holding the same weights (fp32, eval)."""
    from transformers import CsmForConditionalGeneration

    model = CsmForConditionalGeneration(transformers_config(config)).eval()
    missing, unexpected = model.load_state_dict(to_transformers_layout(config, state), strict=False)
    assert not unexpected, unexpected
    assert all(name.startswith("codec_model.") for name in missing), missing
    return model


def transformers_config(config: CSMConfig):
    """The transformers `CsmConfig` equivalent to `config`, with a tiny Mimi as its codec."""
    from transformers import CsmConfig, MimiConfig

    backbone, decoder = config.backbone, config.decoder
    codec = MimiConfig(
        hidden_size=32,
        num_filters=4,
        codebook_size=64,
        codebook_dim=16,
        vector_quantization_hidden_dimension=16,
        upsample_groups=32,
        num_hidden_layers=1,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
    )
    return CsmConfig(
        num_codebooks=config.audio_num_codebooks,
        vocab_size=config.audio_vocab_size,
        text_vocab_size=config.text_vocab_size,
        max_position_embeddings=backbone.max_seq_len,
        rope_parameters=_transformers_rope(backbone, backbone.max_seq_len),
        codec_config=codec.to_dict(),
        # The text-side special ids of the real model lie outside a tiny vocabulary.
        pad_token_id=None,
        bos_token_id=None,
        audio_token_id=None,
        audio_eos_token_id=None,
        depth_decoder_config={
            "num_codebooks": config.audio_num_codebooks,
            "backbone_hidden_size": backbone.dim,
            "vocab_size": config.audio_vocab_size,
            "max_position_embeddings": config.audio_num_codebooks + 1,
            "rope_parameters": _transformers_rope(decoder, config.audio_num_codebooks + 1),
            **_transformers_llama(decoder),
        },
        **_transformers_llama(backbone),
    )


def _transformers_llama(llama: LlamaConfig) -> dict:
    return {
        "hidden_size": llama.dim,
        "intermediate_size": llama.ffn_dim,
        "num_hidden_layers": llama.num_layers,
        "num_attention_heads": llama.num_heads,
        "num_key_value_heads": llama.num_kv_heads,
        "head_dim": llama.head_dim,
        "rms_norm_eps": llama.norm_eps,
    }


def _transformers_rope(llama: LlamaConfig, max_positions: int) -> dict:
    # Sesame's published transformers config bounds the band by original_max / low and
    # original_max / high with original_max = max_positions // 2: the same wavelengths as
    # old_context / low and old_context / high in the original parametrisation.
    original_max = max_positions // 2
    return {
        "rope_type": "llama3",
        "rope_theta": llama.rope_base,
        "factor": llama.rope_scale_factor,
        "low_freq_factor": original_max * llama.rope_low_freq_factor / llama.rope_old_context_len,
        "high_freq_factor": original_max * llama.rope_high_freq_factor / llama.rope_old_context_len,
        "original_max_position_embeddings": original_max,
    }


def to_transformers_layout(config: CSMConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original-layout weights renamed to transformers keys, q/k rows permuted for rotate-half."""
    names = {
        "text_embeddings.weight": "embed_text_tokens.weight",
        "audio_embeddings.weight": "backbone_model.embed_tokens.embed_audio_tokens.weight",
        "codebook0_head.weight": "lm_head.weight",
        "projection.weight": "depth_decoder.model.inputs_embeds_projector.weight",
        "audio_head": "depth_decoder.codebooks_head.weight",
    }
    parts = {
        "attn.q_proj": "self_attn.q_proj",
        "attn.k_proj": "self_attn.k_proj",
        "attn.v_proj": "self_attn.v_proj",
        "attn.output_proj": "self_attn.o_proj",
        "mlp.w1": "mlp.gate_proj",
        "mlp.w2": "mlp.down_proj",
        "mlp.w3": "mlp.up_proj",
        "sa_norm.scale": "input_layernorm.weight",
        "mlp_norm.scale": "post_attention_layernorm.weight",
        "norm.scale": "norm.weight",
    }
    out = {"depth_decoder.model.embed_tokens.weight": state["audio_embeddings.weight"]}
    for name, tensor in state.items():
        if name in names:
            out[names[name]] = tensor
            continue
        stack, rest = name.split(".", 1)
        llama = config.backbone if stack == "backbone" else config.decoder
        for original, renamed in parts.items():
            rest = rest.replace(original, renamed)
        if rest.endswith("q_proj.weight"):
            tensor = _permuted(tensor, llama.num_heads)
        elif rest.endswith("k_proj.weight"):
            tensor = _permuted(tensor, llama.num_kv_heads)
        out[f"{'backbone_model' if stack == 'backbone' else 'depth_decoder.model'}.{rest}"] = tensor
    return out


def _permuted(weight: torch.Tensor, heads: int) -> torch.Tensor:
    rows, dim = weight.shape
    return weight.view(heads, rows // heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)
