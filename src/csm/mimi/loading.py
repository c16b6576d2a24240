"""Read published Mimi weights into the internal layout of `csm.mimi.Mimi`.

Three published layouts, told apart by their keys:
- moshi (`tokenizer-e351c8d8-checkpoint125.safetensors` in `kyutai/moshiko-pytorch-bf16`):
  `encoder.model.0.conv.conv.weight`, fused attention `in_proj_weight`, `rvq_first/rvq_rest`;
- transformers (`kyutai/mimi`): `encoder.layers.0.conv.weight`, separate q/k/v projections
  whose q/k rows are permuted for rotate-half RoPE, `semantic/acoustic_residual_vector_quantizer`;
- the transformers layout under `codec_model.` inside a transformers-layout CSM checkpoint.
Codebooks are stored as running sums and usage counts; the entries are their quotient.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from csm.errors import CheckpointError
from csm.hub import resolve_file
from csm.weights import FindShard, check_keys_and_shapes, read_checkpoint, shard_finder

MOSHI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
# A sharded index comes before model.safetensors: a CSM repo may hold both an original-layout
# model.safetensors (no codec inside) and transformers-layout shards (codec_model.*).
CANDIDATES = (MOSHI_FILE, "model.safetensors.index.json", "model.safetensors")
CSM_PREFIX = "codec_model."

# (pattern, replacement) applied in order; a key no rule maps is unexpected.
_MOSHI_RULES = [
    (r"^(encoder|decoder)\.model\.(\d+)\.(block\.\d+\.)?conv\.conv\.(weight|bias)$", r"\1.layers.\2.\3\4"),
    (r"^decoder\.model\.(\d+)\.convtr\.convtr\.(weight|bias)$", r"decoder.layers.\1.\2"),
    (r"^(encoder|decoder)_transformer\.transformer\.layers\.(\d+)\.", r"\1_transformer.layers.\2."),
    (r"\.self_attn\.in_proj_weight$", ".attn.in_proj.weight"),
    (r"\.self_attn\.out_proj\.weight$", ".attn.out_proj.weight"),
    (r"\.layer_scale_1\.scale$", ".attn_scale"),
    (r"\.layer_scale_2\.scale$", ".mlp_scale"),
    (r"^quantizer\.rvq_first\.", "quantizer.semantic."),
    (r"^quantizer\.rvq_rest\.", "quantizer.acoustic."),
    (r"\.vq\.layers\.(\d+)\._codebook\.(embedding_sum|cluster_usage|_initialized)$", r".codebook.\1.\2"),
    (r"^downsample\.conv\.conv\.conv\.weight$", "downsample.weight"),
    (r"^upsample\.convtr\.convtr\.convtr\.weight$", "upsample.weight"),
]
_TRANSFORMERS_RULES = [
    (r"^(encoder|decoder)\.layers\.(\d+)\.(block\.\d+\.)?conv\.(weight|bias)$", r"\1.layers.\2.\3\4"),
    (r"\.input_layernorm\.", ".norm1."),
    (r"\.post_attention_layernorm\.", ".norm2."),
    (r"\.mlp\.fc1\.weight$", ".linear1.weight"),
    (r"\.mlp\.fc2\.weight$", ".linear2.weight"),
    (r"\.self_attn_layer_scale\.scale$", ".attn_scale"),
    (r"\.mlp_layer_scale\.scale$", ".mlp_scale"),
    (r"\.self_attn\.o_proj\.weight$", ".attn.out_proj.weight"),
    (r"\.self_attn\.(q|k|v)_proj\.weight$", r".attn.\1.weight"),
    (r"^quantizer\.semantic_residual_vector_quantizer\.", "quantizer.semantic."),
    (r"^quantizer\.acoustic_residual_vector_quantizer\.", "quantizer.acoustic."),
    (r"\.layers\.(\d+)\.codebook\.(cluster_usage)$", r".codebook.\1.\2"),
    (r"\.layers\.(\d+)\.codebook\.embed_sum$", r".codebook.\1.embedding_sum"),
    (r"\.layers\.(\d+)\.codebook\.initialized$", r".codebook.\1._initialized"),
    (r"^(downsample|upsample)\.conv\.weight$", r"\1.weight"),
]
_CODEBOOK_PART = re.compile(r"^(quantizer\.\w+)\.codebook\.(\d+)\.(\w+)$")
_QKV_PART = re.compile(r"^(.*\.attn)\.(q|k|v)\.weight$")


def load_weights(
    source: str | os.PathLike,
    expected: Mapping[str, torch.Tensor],
    *,
    revision: str | None,
    device: torch.device | str | None,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """The Mimi weights of `source` in the internal layout, checked against the names and
    shapes of `expected` (a state dict of the target model, e.g. on the meta device)."""
    path = resolve_file(source, CANDIDATES, revision=revision)
    state = read_weights(path, shard_finder(source, revision), device=device, dtype=dtype)
    check_keys_and_shapes(expected, state, f"{path} does not match Mimi")
    return state


def read_weights(
    path: Path,
    find_shard: FindShard | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Read Mimi weights from a checkpoint in any published layout, tensor by tensor straight
    into `dtype` on `device`, and map them to the internal layout."""
    # A sharded index is a transformers-layout CSM checkpoint's: only the shards that hold Mimi are read.
    stored = read_checkpoint(path, find_shard, prefix=CSM_PREFIX if path.suffix == ".json" else "")
    prefix = CSM_PREFIX if any(key.startswith(CSM_PREFIX + "encoder.") for key in stored) else ""
    names = [key[len(prefix) :] for key in stored if key.startswith(prefix)]
    rules = _layout_rules(names, path)
    raw = {}
    for name in names:
        internal = _rename(name, rules)
        # Codebook statistics stay fp32 until their quotient is taken.
        target = torch.float32 if _CODEBOOK_PART.match(internal) else dtype
        raw[internal] = stored[prefix + name].read().to(device=device, dtype=target)
    return _assemble_codebooks(_fuse_qkv(raw), dtype)


def _layout_rules(names: list[str], file: Path) -> list[tuple[str, str]]:
    if any(name.startswith("encoder.model.") for name in names):
        return _MOSHI_RULES
    if any(name.startswith("encoder.layers.") for name in names):
        return _TRANSFORMERS_RULES
    raise CheckpointError(
        f"{file} holds no Mimi weights (no key like encoder.model.* (moshi), encoder.layers.* "
        f"(transformers) or {CSM_PREFIX}encoder.layers.*); Mimi's weights are in "
        f"kyutai/moshiko-pytorch-bf16 or kyutai/mimi"
    )


def _rename(name: str, rules: list[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


def _fuse_qkv(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack separate q/k/v projections (transformers) into one, undoing the permutation of
    the q and k rows from interleaved to rotate-half RoPE order."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    for name, tensor in raw.items():
        match = _QKV_PART.match(name)
        if match:
            parts.setdefault(match[1], {})[match[2]] = tensor
        else:
            out[name] = tensor
    for attn, qkv in parts.items():
        if set(qkv) != {"q", "k", "v"}:
            raise CheckpointError(f"{attn}: missing projections {sorted({'q', 'k', 'v'} - set(qkv))}")
        q, k, v = qkv["q"], qkv["k"], qkv["v"]
        out[f"{attn}.in_proj.weight"] = torch.cat([_interleave_rows(q), _interleave_rows(k), v])
    return out


def _interleave_rows(weight: torch.Tensor, head_dim: int = 64) -> torch.Tensor:
    rows, dim = weight.shape
    return weight.view(rows // head_dim, 2, head_dim // 2, dim).transpose(1, 2).reshape(rows, dim)


def _assemble_codebooks(raw: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Replace per-codebook usage statistics by one [n, size, dim] tensor of entries."""
    stats: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for name, tensor in raw.items():
        match = _CODEBOOK_PART.match(name)
        if not match:
            out[name] = tensor
        elif match[3] != "_initialized":  # a training flag
            stats.setdefault(match[1], {}).setdefault(int(match[2]), {})[match[3]] = tensor
    for group, books in stats.items():
        if sorted(books) != list(range(len(books))) or any(len(b) != 2 for b in books.values()):
            raise CheckpointError(f"{group}: incomplete codebooks (need embedding_sum and cluster_usage for each)")
        entries = [b["embedding_sum"] / b["cluster_usage"].clamp(min=1e-5)[:, None] for _, b in sorted(books.items())]
        out[f"{group}.codebooks"] = torch.stack(entries).to(dtype)
    return out
