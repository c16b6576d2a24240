"""Random full-size Mimi checkpoints in the published layouts, for tests without network.

Plain functions, no pytest: `write_moshi_checkpoint(path)` writes the layout of
`kyutai/moshiko-pytorch-bf16` (tokenizer-e351c8d8-checkpoint125.safetensors),
`write_transformers_checkpoint(folder)` the one of `kyutai/mimi` (model.safetensors +
config.json). Both take a seed and give the same weights for the same seed; writing one takes
a few seconds. `moshi_to_transformers` / `transformers_to_moshi` convert state dicts, e.g.
to nest a Mimi as `codec_model.*` in a transformers-layout CSM checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

MOSHI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
RATIOS = (8, 6, 5, 4)
FILTERS = 64
DIM = 512
LAYERS = 8
HEAD_DIM = 64
FFN = 2048
CODEBOOKS = 32
CODEBOOK_SIZE = 2048
CODEBOOK_DIM = 256

ENCODER_CONVS = (0, 3, 6, 9, 12, 14)
ENCODER_BLOCKS = (1, 4, 7, 10)
DECODER_CONVS = (0, 14)
DECODER_CONVTRS = (2, 5, 8, 11)
DECODER_BLOCKS = (3, 6, 9, 12)


def moshi_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the moshi layout with its shape (318 tensors)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(prefix: str, out_ch: int, in_ch: int, kernel: int, transposed: bool = False) -> None:
        name = "convtr.convtr" if transposed else "conv.conv"
        shapes[f"{prefix}.{name}.weight"] = (in_ch, out_ch, kernel) if transposed else (out_ch, in_ch, kernel)
        shapes[f"{prefix}.{name}.bias"] = (out_ch,)

    def block(prefix: str, channels: int) -> None:
        conv(f"{prefix}.block.1", channels // 2, channels, 3)
        conv(f"{prefix}.block.3", channels, channels // 2, 1)

    channels = FILTERS
    conv("encoder.model.0", channels, 1, 7)
    for conv_index, block_index, stride in zip(ENCODER_CONVS[1:-1], ENCODER_BLOCKS, reversed(RATIOS), strict=True):
        block(f"encoder.model.{block_index}", channels)
        conv(f"encoder.model.{conv_index}", channels * 2, channels, 2 * stride)
        channels *= 2
    conv("encoder.model.14", DIM, channels, 3)
    conv("decoder.model.0", channels, DIM, 7)
    for convtr_index, block_index, stride in zip(DECODER_CONVTRS, DECODER_BLOCKS, RATIOS, strict=True):
        conv(f"decoder.model.{convtr_index}", channels // 2, channels, 2 * stride, transposed=True)
        block(f"decoder.model.{block_index}", channels // 2)
        channels //= 2
    conv("decoder.model.14", 1, channels, 3)
    for side in ("encoder", "decoder"):
        for layer in range(LAYERS):
            prefix = f"{side}_transformer.transformer.layers.{layer}"
            shapes[f"{prefix}.self_attn.in_proj_weight"] = (3 * DIM, DIM)
            shapes[f"{prefix}.self_attn.out_proj.weight"] = (DIM, DIM)
            for norm in ("norm1", "norm2"):
                shapes[f"{prefix}.{norm}.weight"] = (DIM,)
                shapes[f"{prefix}.{norm}.bias"] = (DIM,)
            shapes[f"{prefix}.linear1.weight"] = (FFN, DIM)
            shapes[f"{prefix}.linear2.weight"] = (DIM, FFN)
            shapes[f"{prefix}.layer_scale_1.scale"] = (DIM,)
            shapes[f"{prefix}.layer_scale_2.scale"] = (DIM,)
    for group, count in (("rvq_first", 1), ("rvq_rest", CODEBOOKS - 1)):
        shapes[f"quantizer.{group}.input_proj.weight"] = (CODEBOOK_DIM, DIM, 1)
        shapes[f"quantizer.{group}.output_proj.weight"] = (DIM, CODEBOOK_DIM, 1)
        for index in range(count):
            prefix = f"quantizer.{group}.vq.layers.{index}._codebook"
            shapes[f"{prefix}._initialized"] = (1,)
            shapes[f"{prefix}.cluster_usage"] = (CODEBOOK_SIZE,)
            shapes[f"{prefix}.embedding_sum"] = (CODEBOOK_SIZE, CODEBOOK_DIM)
    shapes["downsample.conv.conv.conv.weight"] = (DIM, DIM, 4)
    shapes["upsample.convtr.convtr.convtr.weight"] = (DIM, 1, 4)
    return shapes


def random_moshi_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp32 weights in the moshi layout, scaled so that activations stay O(1) and
    codebook entries are distinct (no near ties in nearest-entry search)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in moshi_shapes().items():
        if name.endswith("_initialized"):
            tensor = torch.ones(shape)
        elif name.endswith("cluster_usage"):
            tensor = torch.rand(shape, generator=generator) * 1.5 + 0.5
        elif name.endswith("embedding_sum"):
            tensor = torch.randn(shape, generator=generator)
        elif name.endswith(("norm1.weight", "norm2.weight")):
            tensor = torch.ones(shape)
        elif name.endswith("scale"):
            tensor = torch.full(shape, 0.1)
        elif name.endswith("bias"):
            tensor = torch.randn(shape, generator=generator) * 0.01
        else:
            fan_in = math.prod(shape[1:]) if "convtr" not in name else shape[0] * shape[2] // 2
            tensor = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        state[name] = tensor
    return state


def write_moshi_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Write random weights as the official moshi-layout file; a folder gets the official name."""
    path = Path(path)
    if path.is_dir():
        path = path / MOSHI_FILE
    save_file(random_moshi_state_dict(seed), str(path))
    return path


def write_transformers_checkpoint(folder: str | Path, seed: int = 0) -> Path:
    """Write the weights of `write_moshi_checkpoint(seed)` in the `kyutai/mimi` layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(moshi_to_transformers(random_moshi_state_dict(seed)), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "mimi", "num_quantizers": CODEBOOKS}))
    return folder / "model.safetensors"


def _name_pairs() -> list[tuple[str, str]]:
    """(moshi name, transformers name) of every tensor that only changes its name."""
    pairs = []
    for side, convs, blocks in (
        ("encoder", ENCODER_CONVS, ENCODER_BLOCKS),
        ("decoder", DECODER_CONVS + DECODER_CONVTRS, DECODER_BLOCKS),
    ):
        for index in convs:
            kind = "convtr.convtr" if side == "decoder" and index in DECODER_CONVTRS else "conv.conv"
            for param in ("weight", "bias"):
                pairs.append((f"{side}.model.{index}.{kind}.{param}", f"{side}.layers.{index}.conv.{param}"))
        for index in blocks:
            for inner in (1, 3):
                for param in ("weight", "bias"):
                    pairs.append(
                        (
                            f"{side}.model.{index}.block.{inner}.conv.conv.{param}",
                            f"{side}.layers.{index}.block.{inner}.conv.{param}",
                        )
                    )
        for layer in range(LAYERS):
            moshi = f"{side}_transformer.transformer.layers.{layer}"
            hf = f"{side}_transformer.layers.{layer}"
            pairs += [
                (f"{moshi}.self_attn.out_proj.weight", f"{hf}.self_attn.o_proj.weight"),
                (f"{moshi}.norm1.weight", f"{hf}.input_layernorm.weight"),
                (f"{moshi}.norm1.bias", f"{hf}.input_layernorm.bias"),
                (f"{moshi}.norm2.weight", f"{hf}.post_attention_layernorm.weight"),
                (f"{moshi}.norm2.bias", f"{hf}.post_attention_layernorm.bias"),
                (f"{moshi}.linear1.weight", f"{hf}.mlp.fc1.weight"),
                (f"{moshi}.linear2.weight", f"{hf}.mlp.fc2.weight"),
                (f"{moshi}.layer_scale_1.scale", f"{hf}.self_attn_layer_scale.scale"),
                (f"{moshi}.layer_scale_2.scale", f"{hf}.mlp_layer_scale.scale"),
            ]
    for moshi_group, hf_group, count in (
        ("rvq_first", "semantic_residual_vector_quantizer", 1),
        ("rvq_rest", "acoustic_residual_vector_quantizer", CODEBOOKS - 1),
    ):
        for proj in ("input_proj", "output_proj"):
            pairs.append((f"quantizer.{moshi_group}.{proj}.weight", f"quantizer.{hf_group}.{proj}.weight"))
        for index in range(count):
            moshi = f"quantizer.{moshi_group}.vq.layers.{index}._codebook"
            hf = f"quantizer.{hf_group}.layers.{index}.codebook"
            pairs += [
                (f"{moshi}._initialized", f"{hf}.initialized"),
                (f"{moshi}.cluster_usage", f"{hf}.cluster_usage"),
                (f"{moshi}.embedding_sum", f"{hf}.embed_sum"),
            ]
    pairs += [
        ("downsample.conv.conv.conv.weight", "downsample.conv.weight"),
        ("upsample.convtr.convtr.convtr.weight", "upsample.conv.weight"),
    ]
    return pairs


def _to_rotate_half(weight: torch.Tensor) -> torch.Tensor:
    rows, dim = weight.shape
    return weight.view(rows // HEAD_DIM, HEAD_DIM // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def _to_interleaved(weight: torch.Tensor) -> torch.Tensor:
    rows, dim = weight.shape
    return weight.view(rows // HEAD_DIM, 2, HEAD_DIM // 2, dim).transpose(1, 2).reshape(rows, dim)


def moshi_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A moshi-layout state dict in the `kyutai/mimi` (transformers) layout."""
    out = {hf: state[moshi].clone() for moshi, hf in _name_pairs()}
    for side in ("encoder", "decoder"):
        for layer in range(LAYERS):
            q, k, v = state[f"{side}_transformer.transformer.layers.{layer}.self_attn.in_proj_weight"].chunk(3)
            prefix = f"{side}_transformer.layers.{layer}.self_attn"
            out[f"{prefix}.q_proj.weight"] = _to_rotate_half(q)
            out[f"{prefix}.k_proj.weight"] = _to_rotate_half(k)
            out[f"{prefix}.v_proj.weight"] = v.clone()
    return out


def transformers_to_moshi(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `kyutai/mimi` (transformers) layout state dict in the moshi layout."""
    out = {moshi: state[hf].clone() for moshi, hf in _name_pairs()}
    for side in ("encoder", "decoder"):
        for layer in range(LAYERS):
            prefix = f"{side}_transformer.layers.{layer}.self_attn"
            out[f"{side}_transformer.transformer.layers.{layer}.self_attn.in_proj_weight"] = torch.cat(
                [
                    _to_interleaved(state[f"{prefix}.q_proj.weight"]),
                    _to_interleaved(state[f"{prefix}.k_proj.weight"]),
                    state[f"{prefix}.v_proj.weight"],
                ]
            )
    return out
