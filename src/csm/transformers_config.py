"""CSM's configuration as transformers' `CsmConfig` JSON, and back.

The original layout's `config.json` names its two Llama flavors; transformers spells every
field out, with Llama-3 RoPE scaling in its own parametrisation. Checkpoints read the one
(`csm.checkpoints`), `csm merge` writes it (`csm.finetune.merge`); the tensor names are
`csm.layouts`'.
"""

from __future__ import annotations

from typing import Any

from csm.errors import CheckpointError
from csm.llama import FLAVORS, LlamaConfig
from csm.model import CSMConfig


def config_from_transformers(fields: dict[str, Any]) -> CSMConfig:
    """CSMConfig from a transformers `CsmConfig` json (its flavors named when they are known ones)."""
    try:
        backbone = _llama_from_transformers(fields, max_seq_len=fields["max_position_embeddings"])
        # The depth decoder only sees one frame's positions; keep the original flavor's value.
        decoder = _llama_from_transformers(fields["depth_decoder_config"], max_seq_len=LlamaConfig.max_seq_len)
        return CSMConfig(
            audio_num_codebooks=fields["num_codebooks"],
            audio_vocab_size=fields["vocab_size"],
            backbone_flavor=_name_if_known(backbone),
            decoder_flavor=_name_if_known(decoder),
            text_vocab_size=fields["text_vocab_size"],
        )
    except KeyError as error:
        raise CheckpointError(f"transformers config.json lacks the field {error}") from None


def _llama_from_transformers(fields: dict[str, Any], *, max_seq_len: int) -> LlamaConfig:
    heads = fields["num_attention_heads"]
    rope = _rope_from_transformers(fields)
    return LlamaConfig(
        num_layers=fields["num_hidden_layers"],
        dim=fields["hidden_size"],
        num_heads=heads,
        num_kv_heads=fields.get("num_key_value_heads") or heads,
        head_dim=fields.get("head_dim") or fields["hidden_size"] // heads,
        ffn_dim=fields["intermediate_size"],
        max_seq_len=max_seq_len,
        norm_eps=fields.get("rms_norm_eps", 1e-5),
        **rope,
    )


def _rope_from_transformers(fields: dict[str, Any]) -> dict[str, Any]:
    """Llama-3 RoPE scaling from transformers' parametrisation to the original one.

    transformers bounds the scaled band by wavelengths original_max / low and original_max /
    high; the original uses old_context / low' and old_context / high'. With low' = 1 both
    give the same frequencies: old_context = original_max / low, high' = high / low.
    """
    # transformers >= 5 nests everything in rope_parameters; 4.x has rope_theta + rope_scaling.
    rope = fields.get("rope_parameters") or fields.get("rope_scaling") or {}
    base = rope.get("rope_theta", fields.get("rope_theta", 500_000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {"rope_base": base, "rope_scale_factor": 1.0}
    if kind != "llama3":
        raise CheckpointError(f"unsupported RoPE type {kind!r} in config.json (CSM uses llama3)")
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    return {
        "rope_base": base,
        "rope_scale_factor": rope["factor"],
        "rope_low_freq_factor": 1.0,
        "rope_high_freq_factor": high / low,
        "rope_old_context_len": round(rope["original_max_position_embeddings"] / low),
    }


def _name_if_known(config: LlamaConfig) -> str | LlamaConfig:
    return next((name for name, known in FLAVORS.items() if known == config), config)


def transformers_config(config: CSMConfig, codec_config: dict) -> dict:
    """A transformers CsmConfig as JSON, equivalent to `config`."""
    backbone, decoder = config.backbone, config.decoder
    return {
        "model_type": "csm",
        "architectures": ["CsmForConditionalGeneration"],
        "num_codebooks": config.audio_num_codebooks,
        "vocab_size": config.audio_vocab_size,
        "text_vocab_size": config.text_vocab_size,
        "max_position_embeddings": backbone.max_seq_len,
        "codebook_eos_token_id": 0,
        "codebook_pad_token_id": config.audio_vocab_size - 1,
        "tie_codebooks_embeddings": True,
        "codec_config": codec_config,
        "depth_decoder_config": {
            "model_type": "csm_depth_decoder_model",
            "num_codebooks": config.audio_num_codebooks,
            "backbone_hidden_size": backbone.dim,
            "vocab_size": config.audio_vocab_size,
            "max_position_embeddings": config.audio_num_codebooks + 1,
            **_llama_fields(decoder, config.audio_num_codebooks + 1),
        },
        **_llama_fields(backbone, backbone.max_seq_len),
    }


def _llama_fields(llama: LlamaConfig, max_positions: int) -> dict:
    # transformers bounds the scaled band by original_max / low and original_max / high; with
    # original_max = max_positions // 2 these are the original's old_context / low, / high.
    original_max = max_positions // 2
    rope = {
        "rope_type": "llama3",
        "rope_theta": llama.rope_base,
        "factor": llama.rope_scale_factor,
        "low_freq_factor": original_max * llama.rope_low_freq_factor / llama.rope_old_context_len,
        "high_freq_factor": original_max * llama.rope_high_freq_factor / llama.rope_old_context_len,
        "original_max_position_embeddings": original_max,
    }
    return {
        "hidden_size": llama.dim,
        "intermediate_size": llama.ffn_dim,
        "num_hidden_layers": llama.num_layers,
        "num_attention_heads": llama.num_heads,
        "num_key_value_heads": llama.num_kv_heads,
        "head_dim": llama.head_dim,
        "rms_norm_eps": llama.norm_eps,
        "rope_parameters": rope,
        "rope_theta": llama.rope_base,
        "rope_scaling": rope,
    }
