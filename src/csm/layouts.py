"""CSM's two published key layouts and the one map between them.

- original (Sesame's): `backbone.layers.N.attn.q_proj.weight`, `codebook0_head.weight`, ...;
  the names of `csm.model.CSM`'s state dict.
- transformers (`CsmForConditionalGeneration`): `backbone_model.layers.N.self_attn.q_proj.weight`,
  `lm_head.weight`, ...; the q and k rows of each head are stored in rotate-half order (all even
  rows, then all odd ones) instead of RoPE's interleaved pairs, and the bundled Mimi codec sits
  under `codec_model.`.

Checkpoints (`csm.checkpoints`), PEFT adapters (`csm.adapters`) and merged exports
(`csm.finetune.merge`) all translate names and rows through this module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from csm.errors import CheckpointError
from csm.model import CSMConfig
from csm.weights import StoredTensor, some_names

CODEC_PREFIX = "codec_model."
# The depth decoder's audio embeddings are tied to the backbone's: transformers saves one of
# the two names (or both, the second a copy).
TIED_AUDIO_EMBEDDINGS = "depth_decoder.model.embed_tokens.weight"

_TOP_LEVEL = {
    "text_embeddings.weight": "embed_text_tokens.weight",
    "audio_embeddings.weight": "backbone_model.embed_tokens.embed_audio_tokens.weight",
    "codebook0_head.weight": "lm_head.weight",
    "projection.weight": "depth_decoder.model.inputs_embeds_projector.weight",
    "audio_head": "depth_decoder.codebooks_head.weight",
    "backbone.norm.scale": "backbone_model.norm.weight",
    "decoder.norm.scale": "depth_decoder.model.norm.weight",
}
_STACKS = {"backbone": "backbone_model", "decoder": "depth_decoder.model"}
_LAYER_PARTS = {
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.output_proj.weight": "self_attn.o_proj.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "sa_norm.scale": "input_layernorm.weight",
    "mlp_norm.scale": "post_attention_layernorm.weight",
}
_LINEARS = {"codebook0_head", "projection"} | {
    part.removesuffix(".weight") for part in _LAYER_PARTS if part.startswith(("attn.", "mlp."))
}
_ORIGINAL_LAYER = re.compile(r"(backbone|decoder)\.layers\.(\d+)\.(.+)")
_TRANSFORMERS_LAYER = re.compile(r"(backbone_model|depth_decoder\.model)\.layers\.(\d+)\.(.+)")


def _inverted(names: Mapping[str, str]) -> dict[str, str]:
    return {theirs: ours for ours, theirs in names.items()}


_TOP_LEVEL_BACK, _STACKS_BACK, _LAYER_PARTS_BACK = map(_inverted, (_TOP_LEVEL, _STACKS, _LAYER_PARTS))


def transformers_name(name: str) -> str:
    """An original tensor name (`backbone.layers.0.attn.q_proj.weight`) as transformers names it."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    layer = _ORIGINAL_LAYER.fullmatch(name)
    if layer is None or layer.group(3) not in _LAYER_PARTS:
        raise CheckpointError(f"{name} has no transformers name")
    stack, index, part = layer.groups()
    return f"{_STACKS[stack]}.layers.{index}.{_LAYER_PARTS[part]}"


def original_name(name: str) -> str | None:
    """A transformers tensor name as the original layout names it; None when CSM has no such tensor."""
    if name in _TOP_LEVEL_BACK:
        return _TOP_LEVEL_BACK[name]
    layer = _TRANSFORMERS_LAYER.fullmatch(name)
    if layer is None or layer.group(3) not in _LAYER_PARTS_BACK:
        return None
    stack, index, part = layer.groups()
    return f"{_STACKS_BACK[stack]}.layers.{index}.{_LAYER_PARTS_BACK[part]}"


def transformers_linear_name(module: str) -> str:
    """A linear module's original name (`backbone.layers.0.attn.q_proj`) as transformers names it."""
    if not is_linear(module):
        raise CheckpointError(f"module {module} is not a linear of CSM")
    return transformers_name(f"{module}.weight").removesuffix(".weight")


def original_linear_name(module: str) -> str | None:
    """transformers' name of a linear module as the original names it; None when CSM has no such linear."""
    name = original_name(f"{module}.weight")
    module = None if name is None else name.removesuffix(".weight")
    return module if module is not None and is_linear(module) else None


def is_linear(module: str) -> bool:
    """Whether an original module name is one of CSM's linears (what LoRA can adapt)."""
    layer = _ORIGINAL_LAYER.fullmatch(module)
    return module in _LINEARS if layer is None else layer.group(3) in _LINEARS


def qk_heads(config: CSMConfig, name: str) -> int | None:
    """How many heads the rows of an original q or k projection (module or weight name) hold; None for others."""
    layer = _ORIGINAL_LAYER.fullmatch(name.removesuffix(".weight"))
    if layer is None:
        return None
    llama = config.backbone if layer.group(1) == "backbone" else config.decoder
    return {"attn.q_proj": llama.num_heads, "attn.k_proj": llama.num_kv_heads}.get(layer.group(3))


def to_rotate_half(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from interleaved pairs (original) to rotate-half order (transformers)."""
    count, width = rows.shape
    return rows.view(heads, count // heads // 2, 2, width).transpose(1, 2).reshape(count, width)


def from_rotate_half(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from rotate-half order (transformers) back to interleaved pairs (original)."""
    count, width = rows.shape
    return rows.view(heads, 2, count // heads // 2, width).transpose(1, 2).reshape(count, width)


def detect_layout(names: Mapping[str, object]) -> str:
    """'original' or 'transformers', from a checkpoint's tensor names."""
    if "codebook0_head.weight" in names or any(name.startswith("backbone.") for name in names):
        return "original"
    if "lm_head.weight" in names or any(name.startswith("backbone_model.") for name in names):
        return "transformers"
    raise CheckpointError(
        f"not a CSM checkpoint: neither original nor transformers keys (found {some_names(sorted(names), 5)})"
    )


def from_transformers_layout(stored: dict[str, StoredTensor], config: CSMConfig) -> dict[str, StoredTensor]:
    """Stored transformers tensors under their original names, q/k rows un-permuted as they are read.

    The codec is left out (Mimi's loader reads it); names CSM does not have are kept, for the
    key check to report.
    """
    mapped = {}
    for name, tensor in stored.items():
        if name == TIED_AUDIO_EMBEDDINGS or name.startswith(CODEC_PREFIX):
            continue
        ours = original_name(name) or name
        heads = qk_heads(config, ours)
        mapped[ours] = tensor if heads is None else _read_from_rotate_half(tensor, heads)
    if "audio_embeddings.weight" not in mapped and TIED_AUDIO_EMBEDDINGS in stored:
        mapped["audio_embeddings.weight"] = stored[TIED_AUDIO_EMBEDDINGS]
    return mapped


def to_transformers_layout(state: Mapping[str, torch.Tensor], config: CSMConfig) -> dict[str, torch.Tensor]:
    """An original state dict under transformers' names, q/k rows in rotate-half order, tied copy included."""
    tensors = {}
    for name, tensor in state.items():
        heads = qk_heads(config, name)
        tensors[transformers_name(name)] = (tensor if heads is None else to_rotate_half(tensor, heads)).contiguous()
    # transformers keeps the tied copy too; safetensors wants it in its own storage.
    tensors[TIED_AUDIO_EMBEDDINGS] = tensors[_TOP_LEVEL["audio_embeddings.weight"]].clone()
    return tensors


def _read_from_rotate_half(tensor: StoredTensor, heads: int) -> StoredTensor:
    return StoredTensor(tensor.shape, lambda: from_rotate_half(tensor.read(), heads))
