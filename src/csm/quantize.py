"""Quantized linears: weight-only int8 and int4 with PyTorch's own CPU kernels, and the modes.

Modes (`MODES`, the `quantize=` of the loaders and `--quantize` of the commands):

- "int8": weight-only int8. Weights int8 per output channel; activations stay bf16 and the
  kernel converts each weight to float (`QuantizedLinear`).
- "int8-dynamic": the same int8 weights times activations quantized to int8 per row at each
  product, summed in int32 (`csm.int8_dynamic.DynamicInt8Linear`): faster, a little less exact.
  `csm.inference.quantized_linear` picks the module of a mode.
- "int4": weight-only int4, groups of `INT4_GROUP_SIZE` along K.

Both int8 modes store the same weights (`stored_format`), so one quantized folder serves both.

A `QuantizedWeight` is the portable form of one quantized [N, K] matrix, the one checkpoints
store: row by row, so that the rows of several matrices can be concatenated (fused) without
requantizing, and the same on every CPU. `QuantizedLinear` turns it into the form its kernel
needs when it is built:

- int8: per-output-channel symmetric, w = q * scale, q in -127..127, for
  `aten._weight_int8pack_mm` (bf16 activations, fp32 accumulation).
- int4: group-wise asymmetric along K, w = (q - 8) * scale + zero with q in 0..15, packed at
  load for `aten._weight_int4pack_mm_for_cpu` (the packed layout depends on the CPU).

On other devices (CUDA, MPS), or for shapes a kernel cannot take, the weight is
dequantized to bf16 and multiplied at every call: correct, but no faster than bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The stored forms of quantized weights, and the modes that run them.
FORMATS = ("int8", "int4")
MODES = ("int8", "int8-dynamic", "int4")
_STORED = {"int8": "int8", "int8-dynamic": "int8", "int4": "int4"}
# One of the kernel's 32, 64, 128, 256, chosen by measurement (benchmarks/bench_int4_groups.py,
# a frame's full-size products on the 2-core CPU): 32, 64, 128, 256 take 145, 141, 137, 129 ms
# at relative output errors of 7.8%, 8.9%, 10.0%, 10.9%, with 136, 68, 34, 17 MB of scales and
# zeros. Each step up buys ~3% of speed and memory for ~11% more error; 64 stops where the
# error is still within 15% of the finest groups'.
INT4_GROUP_SIZE = 64
# The int8 kernel gives wrong values unless K is a multiple of 16; the int4 kernel needs N a
# multiple of 16 and K a multiple of the group size.
_INT8_K_MULTIPLE = 16
_INT4_N_MULTIPLE = 16
# The int8 kernel crashes on activations that are not 32-byte aligned.
_INT8_ALIGNMENT = 32


@dataclass(frozen=True)
class QuantizedWeight:
    """One [N, K] weight: `data` int8 [N, K] (int8) or uint8 [N, K / 2] holding two 4-bit codes a
    byte, the even column in the low nibble (int4); `scales` [N] (int8) or [N, K / group] (int4);
    `zeros` [N, K / group] (int4 only). Scales and zeros are bf16."""

    format: str
    data: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        rows, columns = self.data.shape
        return rows, columns * (2 if self.format == "int4" else 1)

    @property
    def group_size(self) -> int | None:
        return self.shape[1] // self.scales.shape[1] if self.format == "int4" else None

    def tensors(self) -> dict[str, torch.Tensor]:
        """Its tensors by the suffix a checkpoint stores them under."""
        stored = {"qweight": self.data, "scales": self.scales}
        return stored if self.zeros is None else {**stored, "zeros": self.zeros}


def stored_format(mode: str) -> str:
    """The format ("int8" or "int4") in which a mode's weights are stored."""
    if mode not in _STORED:
        raise ValueError(f"unknown quantization {mode!r}: use one of {', '.join(MODES)}")
    return _STORED[mode]


def quantize(weight: torch.Tensor, format: str, group_size: int = INT4_GROUP_SIZE) -> QuantizedWeight:
    """Quantize a [N, K] weight (any float dtype) for `format` ("int8" or "int4", or a mode of `MODES`)."""
    format = stored_format(format)
    if format == "int8":
        return _quantize_int8(weight)
    return _quantize_int4(weight, group_size)


def _quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    w = weight.float()
    # The scale is rounded to bf16 first so that the codes are chosen for the scale the kernel uses.
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-8).to(torch.bfloat16)
    codes = torch.round(w / scales.float().unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return QuantizedWeight("int8", codes, scales)


def _quantize_int4(weight: torch.Tensor, group_size: int) -> QuantizedWeight:
    rows, columns = weight.shape
    if columns % group_size:
        raise ValueError(f"int4 needs K ({columns}) to be a multiple of the group size {group_size}")
    groups = weight.float().view(rows, columns // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-8).to(torch.bfloat16)
    # w = (q - 8) * scale + zero, with q = 0 at the group's minimum.
    zeros = (low + 8 * scales.float()).to(torch.bfloat16)
    codes = torch.round((groups - zeros.float().unsqueeze(-1)) / scales.float().unsqueeze(-1) + 8).clamp(0, 15)
    return QuantizedWeight("int4", _pack_nibbles(codes.view(rows, columns).to(torch.uint8)), scales, zeros)


def dequantize(weight: QuantizedWeight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The [N, K] matrix that `weight` stands for, in `dtype` (arithmetic in fp32)."""
    if weight.format == "int8":
        return (weight.data.float() * weight.scales.float().unsqueeze(1)).to(dtype)
    rows, columns = weight.shape
    codes = unpack_nibbles(weight.data).float().view(rows, -1, weight.group_size)
    values = (codes - 8) * weight.scales.float().unsqueeze(-1) + weight.zeros.float().unsqueeze(-1)
    return values.view(rows, columns).to(dtype)


def concatenate(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """The rows of several weights of one format (and group size) stacked: fusion without requantizing."""
    if len(weights) == 1:
        return weights[0]
    formats = {(weight.format, weight.group_size, weight.shape[1]) for weight in weights}
    if len(formats) != 1:
        raise ValueError(f"cannot fuse quantized weights of different formats or widths: {sorted(formats)}")
    zeros = None if weights[0].zeros is None else torch.cat([weight.zeros for weight in weights])
    return QuantizedWeight(
        weights[0].format,
        torch.cat([weight.data for weight in weights]),
        torch.cat([weight.scales for weight in weights]),
        zeros,
    )


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] two codes a byte -> uint8 [N, K], one code each."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


class QuantizedLinear(nn.Module):
    """A bias-free linear with a quantized weight; activations and output in bf16."""

    def __init__(self, weight: QuantizedWeight, *, packed: bool | None = None) -> None:
        """`packed` forces (True) or forbids (False) the CPU kernel; by default it is used
        wherever it applies (a CPU weight of a shape the kernel takes)."""
        super().__init__()
        self.format = weight.format
        self.out_features, self.in_features = weight.shape
        applies = weight.data.device.type == "cpu" and _kernel_takes(weight)
        if packed and not applies:
            raise ValueError(
                f"the {weight.format} CPU kernel cannot take a {weight.shape} weight on {weight.data.device}"
            )
        self.packed = applies if packed is None else packed
        self.group_size = weight.group_size
        if not self.packed:
            for name, tensor in weight.tensors().items():
                self.register_buffer(name, tensor, persistent=False)
        elif weight.format == "int8":
            self.register_buffer("qweight", weight.data, persistent=False)
            self.register_buffer("scales", weight.scales, persistent=False)
        else:
            codes = unpack_nibbles(weight.data).to(torch.int32)
            self.register_buffer(
                "qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2), persistent=False
            )
            scales_and_zeros = torch.stack([weight.scales.t(), weight.zeros.t()], dim=-1).contiguous()
            self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            raise TypeError(f"a {self.format} linear takes bfloat16 activations, got {x.dtype}")
        if not self.packed:
            weight = QuantizedWeight(self.format, self.qweight, self.scales, getattr(self, "zeros", None))
            return F.linear(x, dequantize(weight, x.dtype))
        rows = x.reshape(-1, self.in_features)
        # A compiled graph cannot look at data pointers: there every input is copied.
        if torch.compiler.is_compiling() or not rows.is_contiguous() or rows.data_ptr() % _INT8_ALIGNMENT:
            rows = rows.clone(memory_format=torch.contiguous_format)
        if self.format == "int8":
            out = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scales)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.qweight, self.group_size, self.scales_and_zeros)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kernel = "packed CPU kernel" if self.packed else "dequantized"
        return f"{self.format}, in_features={self.in_features}, out_features={self.out_features}, {kernel}"


def _kernel_takes(weight: QuantizedWeight) -> bool:
    rows, columns = weight.shape
    if weight.format == "int8":
        return columns % _INT8_K_MULTIPLE == 0
    return rows % _INT4_N_MULTIPLE == 0 and weight.group_size in (32, 64, 128, 256)
