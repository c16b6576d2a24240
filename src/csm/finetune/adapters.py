"""LoRA adapters in the PEFT format, under the module names of transformers' CSM.

An adapter folder holds `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight`
and `.lora_B.weight`) and `adapter_config.json`, with `<module>` named as in transformers'
`CsmForConditionalGeneration` (`backbone_model.layers.N.self_attn.q_proj`, `lm_head`, ...).
So PEFT on transformers loads ours, and we load theirs. transformers stores the q/k rows of
each head permuted for rotate-half RoPE; an adapter's lora_B rows follow its weight's rows,
so they are permuted the same way on the way out and back on the way in.

Adapters made with PEFT on transformers' CSM by matching module suffixes also wrap the
layers of the bundled Mimi (`codec_model.*`). Training never reaches them (the codec runs
without gradients), so their lora_B stays zero: those are left out, and a non-zero one is an
error, like every module we do not know. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from csm import hub
from csm.errors import CheckpointError
from csm.finetune.lora import LoRALinear, lora_modules
from csm.model import CSMConfig
from csm.weights import StoredTensor, read_checkpoint, some_names

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_CODEC_PREFIX = "codec_model."
_TOP_LEVEL = {"codebook0_head": "lm_head", "projection": "depth_decoder.model.inputs_embeds_projector"}
_STACKS = {"backbone": "backbone_model", "decoder": "depth_decoder.model"}
_PARTS = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.output_proj": "self_attn.o_proj",
    "mlp.w1": "mlp.gate_proj",
    "mlp.w2": "mlp.down_proj",
    "mlp.w3": "mlp.up_proj",
}
_OURS = re.compile(r"(backbone|decoder)\.layers\.(\d+)\.(.+)")
_THEIRS = re.compile(r"(backbone_model|depth_decoder\.model)\.layers\.(\d+)\.(.+)")


@dataclass(frozen=True)
class LoRAWeights:
    """One module's update `B @ A * scaling`, with B's rows in our (interleaved) order."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    def delta(self) -> torch.Tensor:
        return (self.B.float() @ self.A.float()) * self.scaling


def transformers_module_name(name: str) -> str:
    """Our module name (`backbone.layers.0.attn.q_proj`) as transformers' CSM names it."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    match = _OURS.fullmatch(name)
    if match is None or match.group(3) not in _PARTS:
        raise CheckpointError(f"module {name} has no transformers name")
    stack, index, part = match.groups()
    return f"{_STACKS[stack]}.layers.{index}.{_PARTS[part]}"


def our_module_name(name: str) -> str | None:
    """transformers' module name as ours; None when CSM has no such linear."""
    for ours, theirs in _TOP_LEVEL.items():
        if name == theirs:
            return ours
    match = _THEIRS.fullmatch(name)
    if match is None:
        return None
    stack, index, part = match.groups()
    ours = {theirs: ours for ours, theirs in _PARTS.items()}.get(part)
    stack = "backbone" if stack == "backbone_model" else "decoder"
    return None if ours is None else f"{stack}.layers.{index}.{ours}"


def save_adapter(model: torch.nn.Module, folder: Path, *, rank: int, alpha: float, base_model: str | None) -> None:
    """Write the model's LoRA modules as a PEFT adapter folder."""
    folder.mkdir(parents=True, exist_ok=True)
    modules = lora_modules(model)
    tensors, names = {}, []
    for name, module in modules.items():
        theirs = transformers_module_name(name)
        names.append(theirs)
        heads = qk_heads(model.config, name)
        tensors[f"{_PREFIX}{theirs}.lora_A.weight"] = module.lora_A.detach().float().cpu().contiguous()
        B = module.lora_B.detach().float().cpu()
        tensors[f"{_PREFIX}{theirs}.lora_B.weight"] = (B if heads is None else rotate_half_rows(B, heads)).contiguous()
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        # Full names, not suffixes: PEFT would otherwise also wrap the codec's q/k/v/o_proj.
        "target_modules": sorted(names),
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load_adapter(source: hub.Source, config: CSMConfig, *, revision: str | None = None) -> dict[str, LoRAWeights]:
    """A PEFT LoRA adapter (hub repo, folder or its safetensors file) as updates per module of ours."""
    weights_path = hub.resolve_file(source, [ADAPTER_WEIGHTS], revision=revision)
    settings = _read_settings(source, weights_path, revision)
    stored = read_checkpoint(weights_path)
    pairs = _pairs(stored, weights_path)
    adapter, unknown = {}, []
    for theirs, (A, B) in sorted(pairs.items()):
        ours = our_module_name(theirs)
        if ours is None:
            if theirs.startswith(_CODEC_PREFIX) and not B.read().any():
                continue  # never trained: see the module docstring
            unknown.append(theirs)
            continue
        A_tensor, B_tensor = A.read().float(), B.read().float()
        heads = qk_heads(config, ours)
        if heads is not None:
            B_tensor = _interleaved_rows(B_tensor, heads)
        adapter[ours] = LoRAWeights(A_tensor, B_tensor, _scaling(settings, theirs, A_tensor.shape[0]))
    if unknown:
        raise CheckpointError(
            f"adapter {weights_path} has LoRA weights for modules CSM does not have: {some_names(unknown)}"
        )
    if not adapter:
        raise CheckpointError(f"adapter {weights_path} holds no LoRA weights for CSM")
    return adapter


def check_adapter_shapes(adapter: dict[str, LoRAWeights], shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """An error naming every module whose update does not fit the base weight (or that is missing)."""
    problems = []
    for name, weights in sorted(adapter.items()):
        shape = shapes.get(f"{name}.weight")
        update = (weights.B.shape[0], weights.A.shape[1])
        if shape is None:
            problems.append(f"{name} (no such weight in the model)")
        elif tuple(shape) != update or weights.A.shape[0] != weights.B.shape[1]:
            problems.append(f"{name} (adapter {update[0]}x{update[1]}, model {shape[0]}x{shape[1]})")
    if problems:
        raise CheckpointError(f"adapter {where} does not fit the model: {some_names(problems)}")


def merged(stored: dict[str, StoredTensor], adapter: dict[str, LoRAWeights], where: str) -> dict[str, StoredTensor]:
    """Stored original-layout tensors with the adapter's updates added (in float32) as they are read."""
    check_adapter_shapes(adapter, {name: tensor.shape for name, tensor in stored.items()}, where)
    result = dict(stored)
    for name, weights in adapter.items():
        base = stored[f"{name}.weight"]
        result[f"{name}.weight"] = StoredTensor(
            base.shape, lambda base=base, weights=weights: base.read().float() + weights.delta()
        )
    return result


def apply_adapter(model: torch.nn.Module, adapter: dict[str, LoRAWeights]) -> None:
    """Put the adapter into the LoRA modules of a model made by `add_lora` with the same targets."""
    modules = lora_modules(model)
    missing = sorted(set(adapter) - set(modules))
    if missing:
        raise CheckpointError(f"the adapter has modules the model has no LoRA for: {some_names(missing)}")
    with torch.no_grad():
        for name, weights in adapter.items():
            module: LoRALinear = modules[name]
            module.lora_A.copy_(weights.A)
            module.lora_B.copy_(weights.B)
            module.scaling = weights.scaling


def _read_settings(source: hub.Source, weights_path: Path, revision: str | None) -> dict:
    beside = weights_path.parent / ADAPTER_CONFIG
    path = beside if beside.is_file() else hub.resolve_file(source, [ADAPTER_CONFIG], revision=revision)
    try:
        settings = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(settings, dict) or settings.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: not a LoRA adapter (peft_type {settings.get('peft_type')!r})")
    unsupported = [
        key
        for key, usual in (("use_dora", False), ("bias", "none"), ("modules_to_save", None), ("fan_in_fan_out", False))
        if settings.get(key, usual) not in (usual, [], {})
    ]
    if unsupported:
        raise CheckpointError(f"{path}: adapter settings csm does not support: {', '.join(unsupported)}")
    return settings


def _pairs(stored: dict[str, StoredTensor], path: Path) -> dict[str, tuple[StoredTensor, StoredTensor]]:
    pattern = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")
    found: dict[str, dict[str, StoredTensor]] = {}
    stray = []
    for key, tensor in stored.items():
        match = pattern.fullmatch(key)
        if match is None:
            stray.append(key)
            continue
        found.setdefault(match.group(1), {})[match.group(2)] = tensor
    incomplete = [name for name, parts in found.items() if set(parts) != {"A", "B"}]
    if stray or incomplete:
        raise CheckpointError(
            f"adapter {path} has tensors that are not LoRA pairs: {some_names(sorted(stray + incomplete))}"
        )
    return {name: (parts["A"], parts["B"]) for name, parts in found.items()}


def _scaling(settings: dict, module: str, rank: int) -> float:
    alpha = settings.get("lora_alpha", 8)
    for pattern, value in (settings.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
            alpha = value
    return alpha / math.sqrt(rank) if settings.get("use_rslora") else alpha / rank


def qk_heads(config: CSMConfig, name: str) -> int | None:
    match = _OURS.fullmatch(name)
    if match is None:
        return None
    llama = config.backbone if match.group(1) == "backbone" else config.decoder
    return {"attn.q_proj": llama.num_heads, "attn.k_proj": llama.num_kv_heads}.get(match.group(3))


def rotate_half_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    count, width = rows.shape
    return rows.view(heads, count // heads // 2, 2, width).transpose(1, 2).reshape(count, width)


def _interleaved_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    count, width = rows.shape
    return rows.view(heads, 2, count // heads // 2, width).transpose(1, 2).reshape(count, width)
