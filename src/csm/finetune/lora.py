"""LoRA: a trainable low-rank update `B @ A * alpha / rank` beside frozen linear weights.

`add_lora` swaps the targeted `nn.Linear` modules of a CSM for `LoRALinear`, which keeps the
frozen `weight` under the same name (so the state dict stays an original-layout checkpoint
plus `lora_A` / `lora_B`), and `merge_lora` folds the updates back into plain linears.
`lora_weights` and `apply_adapter` move the updates out to and back from the PEFT adapter
format of `csm.adapters`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from csm.adapters import LoRAWeights
from csm.errors import CheckpointError
from csm.model import CSM
from csm.weights import some_names

# Module names inside each decoder layer; "heads" adds codebook0_head and projection.
LAYER_TARGETS = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3")
HEAD_TARGETS = ("codebook0_head", "projection")
DEFAULT_TARGETS = LAYER_TARGETS
_LAYER_MODULE = re.compile(r"(backbone|decoder)\.layers\.\d+\.(attn|mlp)\.(\w+)")


class LoRALinear(nn.Linear):
    """A linear layer with a frozen weight and a trainable rank-`rank` update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        self.scaling = alpha / rank

    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """A as PEFT initialises it (Kaiming uniform), B zero: the update starts at zero."""
        with torch.no_grad():
            bound = 1 / math.sqrt(self.in_features)
            self.lora_A.copy_(torch.rand(self.lora_A.shape, generator=generator) * 2 * bound - bound)
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scaling
        return super().forward(x) + update.to(x.dtype)

    def delta(self) -> torch.Tensor:
        """The update of the weight, in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


def target_module_names(model: CSM, targets: Sequence[str]) -> list[str]:
    """The names of the linear modules that `targets` (short names, see LAYER_TARGETS and
    HEAD_TARGETS) pick; an unknown target is an error, so no layer silently stays untrained."""
    known = (*LAYER_TARGETS, *HEAD_TARGETS)
    unknown = [target for target in targets if target not in known]
    if unknown:
        raise ValueError(f"unknown LoRA targets {', '.join(unknown)}; known: {', '.join(known)}")
    names = []
    for name, module in model.named_modules():
        layer = _LAYER_MODULE.fullmatch(name)
        short = layer.group(3) if layer else name
        if isinstance(module, nn.Linear) and short in targets:
            names.append(name)
    return names


def add_lora(
    model: CSM, targets: Sequence[str], rank: int, alpha: float, generator: torch.Generator | None = None
) -> list[str]:
    """Swap the targeted linears for `LoRALinear` (float32 adapters); returns their names."""
    if rank < 1:
        raise ValueError(f"the LoRA rank must be a positive integer, got {rank}")
    names = target_module_names(model, targets)
    for name in names:
        module = LoRALinear(model.get_submodule(name), rank, alpha)
        module.reset_lora(generator)
        _replace(model, name, module)
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def lora_weights(model: nn.Module) -> dict[str, LoRAWeights]:
    """The updates of the model's LoRA modules, by module name (what `csm.adapters.save_adapter` writes)."""
    return {
        name: LoRAWeights(module.lora_A, module.lora_B, module.scaling) for name, module in lora_modules(model).items()
    }


def apply_adapter(model: nn.Module, adapter: dict[str, LoRAWeights]) -> None:
    """Put an adapter (`csm.adapters.load_adapter`) into the LoRA modules of a model made by
    `add_lora` with the same targets."""
    modules = lora_modules(model)
    missing = sorted(set(adapter) - set(modules))
    if missing:
        raise CheckpointError(f"the adapter has modules the model has no LoRA for: {some_names(missing)}")
    with torch.no_grad():
        for name, weights in adapter.items():
            module = modules[name]
            module.lora_A.copy_(weights.A)
            module.lora_B.copy_(weights.B)
            module.scaling = weights.scaling


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its weight and put plain linears back."""
    for name, module in lora_modules(model).items():
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        with torch.no_grad():
            merged = module.weight.float() + module.delta().to(module.weight.device)
        plain.weight = nn.Parameter(merged.to(module.weight.dtype), requires_grad=False)
        plain.bias = module.bias
        _replace(model, name, plain)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
