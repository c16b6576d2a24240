"""The inference form of a CSM whose weights are final: fused products, optionally quantized.

`prepare(model, quantize)` swaps modules in place, once, after loading (and after any
adapter is merged into the plain weights):

- each layer's `Attention` becomes a `FusedAttention` whose q/k/v projections are one
  product, and its `MLP` a `FusedMLP` whose w1 and w3 are one (`csm.llama`): one weight read
  and one kernel call instead of three or two, with bit-identical outputs (each output row is
  the same dot product whichever matrix holds it);
- each codebook's head is laid out as rows, for the one-row mat-vec kernel;
- with `quantize` one of `csm.quantize.MODES` ("int8", "int8-dynamic", "int4"), every linear
  of the backbone and the depth decoder and the projection between them becomes a quantized
  linear (`quantized_linear`). The embeddings and the two heads stay as they
  are: embeddings are gathered, not multiplied (a lookup reads 2 rows, not the table), and the
  heads pick the codes themselves, so their error would change tokens directly; they are also
  only ~1.5% of a frame's weight traffic.

The plain model (`csm.loading.load_csm`) keeps the published layout, for training and for
saving; the prepared one (`csm.loading.load_for_generation`) is for generation only.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from csm import quantize as quantization
from csm.device_quantize import device_linear
from csm.int8_dynamic import DynamicInt8Linear
from csm.kernels import MV, Choice, KernelTable, Shape, default_table
from csm.kernels import chooses as kernel_chooses
from csm.llama import FusedAttention, FusedMLP, Linear, is_matrix_vector
from csm.model import CSM
from csm.quantize import MODES, QuantizedLinear, QuantizedWeight, concatenate, stored_format


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in MODES:
        raise ValueError(f"unknown quantize={quantize!r}: use None, {' or '.join(map(repr, MODES))}")


def quantized_linear_names(model: CSM) -> list[str]:
    """The published names (without `.weight`) of the linears that quantization covers."""
    names = ["projection"]
    for stack in ("backbone", "decoder"):
        for index in range(len(getattr(model, stack).layers)):
            prefix = f"{stack}.layers.{index}"
            names += [f"{prefix}.attn.{part}" for part in ("q_proj", "k_proj", "v_proj", "output_proj")]
            names += [f"{prefix}.mlp.{part}" for part in ("w1", "w2", "w3")]
    return names


def prepare(
    model: CSM,
    quantize: str | None = None,
    *,
    quantized: Callable[[str], QuantizedWeight] | None = None,
    kernels: KernelTable | None = None,
) -> CSM:
    """Swap the layers of `model` for their inference form in place; returns it.

    Each `Attention` becomes a `FusedAttention` and each `MLP` a `FusedMLP` (`csm.llama`),
    whose products are fused (and with `quantize`, quantized) linears; so does the projection.

    `quantized` reads the already quantized weight of a linear by its published name (from a
    quantized checkpoint, one layer at a time); the linears of `model` may then be on the
    meta device; `quantize` then names the mode that runs them (default: their stored format).
    The one-row kernel of every bf16 weight on the CPU is then chosen from `kernels` (default:
    `csm.kernels.default_table()`, measured on first use), see `choose_kernels`.
    """
    check_quantize(quantize)
    dtype = model.codebook0_head.weight.dtype
    if (quantize or quantized) and dtype != torch.bfloat16:
        raise ValueError(f"quantized models run in bfloat16, not {str(dtype).removeprefix('torch.')}")

    def fused(*names: str) -> nn.Module:
        parts = [quantized(name) if quantized else model.get_submodule(name).weight for name in names]
        return _linear(parts, quantize)

    for stack in ("backbone", "decoder"):
        llama = getattr(model, stack)
        for index, layer in enumerate(llama.layers):
            prefix = f"{stack}.layers.{index}"
            qkv_proj = fused(*(f"{prefix}.attn.{part}" for part in ("q_proj", "k_proj", "v_proj")))
            attention = FusedAttention(llama.config, qkv_proj, fused(f"{prefix}.attn.output_proj"))
            attention.cache = layer.attn.cache
            layer.attn = attention
            layer.mlp = FusedMLP(fused(f"{prefix}.mlp.w1", f"{prefix}.mlp.w3"), fused(f"{prefix}.mlp.w2"))
    model.projection = fused("projection")
    if not model.audio_head.is_meta:
        arrange_audio_head(model)
    choose_kernels(model, kernels)
    return model


def choose_kernels(model: CSM, table: KernelTable | None = None, *, apply: bool = True) -> list[ProductKernel]:
    """Give each bf16/fp16 CPU linear of `model`, and the depth decoder's heads, the one-row
    kernel that `table` finds fastest for its shape; returns what was chosen, per shape.

    Idempotent; weights still on the meta device (a quantized checkpoint being built) are left
    for a later call. A linear whose choice is `onednn-packed` has its weight packed in place.
    With `apply=False` it only reports (what `csm bench` prints).
    """
    table = table or default_table()
    # By shape, the heads apart: they run a plain kernel even where their shape's choice is packed.
    chosen: dict[tuple[Shape, bool], ProductKernel] = {}
    # Every shape first, so that those not in the cache are measured together (see measure_many).
    weights = [module.weight for module in model.modules() if isinstance(module, Linear)]
    weights.append(model.audio_head[0].t())
    table.choices([Shape(w.shape[0], w.shape[1], w.dtype) for w in weights if kernel_chooses(w)])

    def choose(name: str, weight: torch.Tensor) -> Choice:
        shape = Shape(weight.shape[0], weight.shape[1], weight.dtype)
        choice = table.choice(shape)
        group = (shape, name == "audio_head")
        if group in chosen:
            chosen[group].names.append(name)
        else:
            chosen[group] = ProductKernel(shape, choice, [name])
        return choice

    for name, module in model.named_modules():
        if isinstance(module, Linear) and kernel_chooses(module.weight):
            choice = choose(name, module.weight)
            if apply:
                module.use_kernel(choice.kernel)
    head = model.audio_head
    if kernel_chooses(head[0].t()) and head[0].t().is_contiguous():
        # The heads are slices of one tensor, passed to the compiled step: a plain kernel only.
        choice = choose("audio_head", head[0].t())
        if apply:
            model.head_kernel = choice.plain
    return list(chosen.values())


@dataclass
class ProductKernel:
    """The kernel chosen for one weight shape, and the modules that have that shape."""

    shape: Shape
    choice: Choice
    names: list[str]

    @property
    def kernel(self) -> str:
        """The kernel these modules run: the heads cannot be packed, so they take the best plain one."""
        return self.choice.plain if self.names == ["audio_head"] else self.choice.kernel

    @property
    def label(self) -> str:
        """The modules by their name within a layer: "backbone attn.qkv_proj", "audio_head"."""
        names = (re.sub(r"\.layers\.\d+\.", " ", name).removesuffix(".linear") for name in self.names)
        return ", ".join(dict.fromkeys(names))


def arrange_audio_head(model: CSM) -> None:
    """Lay each codebook's head out as rows [V, dim] in memory (the same [K-1, dim, V] values,
    transposed strides): a one-row product then runs the mat-vec kernel over it, about twice as
    fast as the general product that the published [dim, V] layout needs."""
    head = model.audio_head.detach()
    model.audio_head = nn.Parameter(head.transpose(1, 2).contiguous().transpose(1, 2), requires_grad=False)


def _linear(parts: list[torch.Tensor | QuantizedWeight], quantize: str | None) -> nn.Module:
    """One module for the linears whose weights are `parts`: itself for one, else a `FusedLinear`."""
    sizes = [part.shape[0] for part in parts]
    if all(isinstance(part, QuantizedWeight) for part in parts):
        linear = _quantized_linear(concatenate(parts), quantize or parts[0].format)
    else:
        weight = parts[0] if len(parts) == 1 else torch.cat(parts)
        del parts[:]  # the separate weights are freed as soon as their modules are
        if quantize is not None:
            linear = _quantized_linear(quantization.quantize(weight, quantize), quantize)
        else:
            with torch.device("meta"):
                linear = Linear(weight.shape[1], weight.shape[0])
            linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear if len(sizes) == 1 else FusedLinear(linear, sizes)


def quantized_linear(weight: QuantizedWeight, mode: str) -> nn.Module:
    """The CPU module that runs `weight` in `mode` (whose stored format `weight` must have)."""
    if stored_format(mode) != weight.format:
        raise ValueError(f"mode {mode} runs {stored_format(mode)} weights, not {weight.format}")
    return DynamicInt8Linear(weight) if mode == "int8-dynamic" else QuantizedLinear(weight)


def _quantized_linear(weight: QuantizedWeight, mode: str) -> nn.Module:
    """`mode`'s CPU module on the CPU; on a GPU PyTorch's weight-only kernels there, or a clear
    refusal (`csm.device_quantize`): never the whole weight dequantized at every product."""
    if weight.data.device.type in ("cpu", "meta"):
        return quantized_linear(weight, mode)
    return device_linear(weight)


class FusedLinear(nn.Module):
    """Several linears of the same input as one, their weights' rows stacked: returns one output each.

    A quantized kernel and the one-row mat-vec kernel compute every output row alone, so one
    product over the stacked weight gives each part bit for bit. Multi-row float kernels
    (oneDNN, MKL) block the reduction by the output width, so those run each part on its own
    rows of the weight, exactly as the separate linears did.
    """

    def __init__(self, linear: nn.Module, sizes: list[int]) -> None:
        super().__init__()
        self.linear = linear
        self.sizes = sizes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        linear = self.linear
        if isinstance(linear, Linear) and linear.packed_key is None and self._separately(x, linear.kernel):
            return tuple(F.linear(x, weight) for weight in linear.weight.split(self.sizes))
        return linear(x).split(self.sizes, dim=-1)

    @staticmethod
    def _separately(x: torch.Tensor, kernel: str) -> bool:
        """Whether the parts run apart, as the separate linears did: on the CPU, except one row
        through `torch.mv` (exact) and products whose kernel was chosen by speed (bf16 and fp16,
        which need not match the separate products bit for bit). A GPU always runs one product:
        there a launch costs more than rounding is worth, and float32 there is not the oracle's."""
        if x.device.type != "cpu" or is_matrix_vector(x):
            return False
        return x.dtype == torch.float32 or kernel == MV
