"""LoRA adapters in the PEFT format, under the module names of transformers' CSM: read, merged, written.

An adapter folder holds `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight`
and `.lora_B.weight`) and `adapter_config.json`, with `<module>` named as in transformers'
`CsmForConditionalGeneration` (`backbone_model.layers.N.self_attn.q_proj`, `lm_head`, ...).
So PEFT on transformers loads ours, and we load theirs. transformers stores the q/k rows of
each head permuted for rotate-half RoPE; an adapter's lora_B rows follow its weight's rows,
so they are permuted the same way on the way out and back on the way in (`csm.layouts`).

Inference merges an adapter into the weights as they load (`csm.checkpoints`); fine-tuning
writes its LoRA modules out and puts an adapter back into them (`csm.finetune.lora`).

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
from csm.layouts import (
    CODEC_PREFIX,
    from_rotate_half,
    original_linear_name,
    qk_heads,
    to_rotate_half,
    transformers_linear_name,
)
from csm.model import CSMConfig
from csm.weights import StoredTensor, read_checkpoint, some_names

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoRAWeights:
    """One module's update `B @ A * scaling`, with B's rows in our (interleaved) order."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    def delta(self) -> torch.Tensor:
        return (self.B.float() @ self.A.float()) * self.scaling


def save_adapter(
    adapter: dict[str, LoRAWeights],
    config: CSMConfig,
    folder: Path,
    *,
    rank: int,
    alpha: float,
    base_model: str | None,
) -> None:
    """Write LoRA updates (by our module name) as a PEFT adapter folder for a CSM of `config`."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors, names = {}, []
    for name, weights in adapter.items():
        theirs = transformers_linear_name(name)
        names.append(theirs)
        heads = qk_heads(config, name)
        tensors[f"{_PREFIX}{theirs}.lora_A.weight"] = weights.A.detach().float().cpu().contiguous()
        B = weights.B.detach().float().cpu()
        tensors[f"{_PREFIX}{theirs}.lora_B.weight"] = (B if heads is None else to_rotate_half(B, heads)).contiguous()
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
        ours = original_linear_name(theirs)
        if ours is None:
            if theirs.startswith(CODEC_PREFIX) and not B.read().any():
                continue  # never trained: see the module docstring
            unknown.append(theirs)
            continue
        A_tensor, B_tensor = A.read().float(), B.read().float()
        heads = qk_heads(config, ours)
        if heads is not None:
            B_tensor = from_rotate_half(B_tensor, heads)
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
