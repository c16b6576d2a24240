"""Fold an adapter into a model and write a full checkpoint, in the original or transformers layout.

The transformers layout is what `CsmForConditionalGeneration.from_pretrained` reads: its
tensor names, q/k rows permuted for rotate-half RoPE, a CsmConfig `config.json`, and the
Mimi codec as `codec_model.*`, taken from the model source when it has one, else from the
`kyutai/mimi` layout source `codec`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from csm import hub
from csm.checkpoints import WEIGHT_FILES
from csm.layouts import CODEC_PREFIX, to_transformers_layout
from csm.llama import LlamaConfig
from csm.loading import load_csm
from csm.model import CSMConfig
from csm.weights import read_checkpoint, shard_finder

LAYOUTS = ("original", "transformers")


def merge(
    model: hub.Source, adapter: hub.Source, output: Path, *, layout: str = "original", codec: hub.Source = "kyutai/mimi"
) -> Path:
    """Write `model` with `adapter` merged into `output` (a folder); returns the weights file."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    merged = load_csm(model, adapter=adapter)
    output.mkdir(parents=True, exist_ok=True)
    if layout == "original":
        save_file(
            {name: tensor.contiguous() for name, tensor in merged.state_dict().items()},
            str(output / "model.safetensors"),
        )
        (output / "config.json").write_text(json.dumps(merged.config.to_dict()))
    else:
        tensors = to_transformers_layout(merged.state_dict(), merged.config)
        tensors.update(_codec_tensors(model, codec))
        save_file(tensors, str(output / "model.safetensors"), metadata={"format": "pt"})
        (output / "config.json").write_text(
            json.dumps(transformers_config(merged.config, _codec_config(model, codec)), indent=2)
        )
    return output / "model.safetensors"


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


def _model_stored(model: hub.Source):
    path = hub.resolve_file(model, WEIGHT_FILES)
    return path, read_checkpoint(path, shard_finder(model, None), prefix=CODEC_PREFIX)


def _codec_tensors(model: hub.Source, codec: hub.Source) -> dict[str, torch.Tensor]:
    _, bundled = _model_stored(model)
    if bundled:
        return {name: tensor.read() for name, tensor in bundled.items()}
    path = hub.resolve_file(codec, ["model.safetensors"])
    return {f"{CODEC_PREFIX}{name}": tensor.read() for name, tensor in read_checkpoint(path).items()}


def _codec_config(model: hub.Source, codec: hub.Source) -> dict:
    path, bundled = _model_stored(model)
    if bundled:
        config_path = path.parent / "config.json"
        return json.loads(config_path.read_text())["codec_config"]
    return json.loads(hub.resolve_file(codec, ["config.json"]).read_text())
