"""int8 and int4 linears on a GPU (CUDA, MPS), through PyTorch's own kernels there, or a refusal.

The CPU kernels of `csm.quantize` do not run on a GPU, and dequantizing the whole weight at
every product (what a GPU would otherwise do) reads more memory than the bf16 weight itself. So
on a GPU a quantized linear uses:

- int8: `aten._weight_int8pack_mm(x, w int8 [N, K], scales [N])`, the same layout as on the CPU;
- int4: `aten._weight_int4pack_mm(x, packed, group, scales_and_zeros [K/group, N, 2])`, the weight
  packed at load by `aten._convert_weight_to_int4pack(uint8 [N, K/2], inner_k_tiles)`, two codes
  a byte with the even column in the HIGH nibble (the CPU form stores it in the low one), and the
  same dequantization, (q - 8) * scale + zero.

Whether a device has the kernel depends on the torch build, the GPU and the OS, so the first
linear of a format on a device tries the kernel on a small weight against the dequantized
product; if that fails, loading stops with `QuantizationUnsupported`, naming what does run.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from csm.quantize import QuantizedWeight, dequantize, quantize, unpack_nibbles

# The int4 kernel's tiling: K must be a multiple of inner_k_tiles * 16, N of 8.
INT4_INNER_K_TILES = 8
_INT4_N_MULTIPLE = 8


class QuantizationUnsupported(ValueError):
    """A quantized format that has no kernel on the requested device."""


class DeviceQuantizedLinear(nn.Module):
    """A bias-free quantized linear on a GPU; bf16 activations and output, any number of rows."""

    def __init__(self, weight: QuantizedWeight) -> None:
        super().__init__()
        self.format = weight.format
        self.out_features, self.in_features = weight.shape
        self.group_size = weight.group_size
        check_shape(weight)
        if weight.format == "int8":
            self.register_buffer("qweight", weight.data.contiguous(), persistent=False)
            self.register_buffer("scales", weight.scales.contiguous(), persistent=False)
        else:
            self.register_buffer("qweight", pack_int4(weight), persistent=False)
            scales_and_zeros = torch.stack([weight.scales.t(), weight.zeros.t()], dim=-1).contiguous()
            self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        if self.format == "int8":
            out = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scales)
        else:
            out = torch.ops.aten._weight_int4pack_mm(rows, self.qweight, self.group_size, self.scales_and_zeros)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.format}, in_features={self.in_features}, out_features={self.out_features}, device kernel"


def pack_int4(weight: QuantizedWeight) -> torch.Tensor:
    """The int4 codes in the GPU kernel's packed layout."""
    return torch.ops.aten._convert_weight_to_int4pack(high_nibble_first(weight), INT4_INNER_K_TILES)


def high_nibble_first(weight: QuantizedWeight) -> torch.Tensor:
    """uint8 [N, K/2]: two codes a byte, the even column in the high nibble (what the GPU packing reads)."""
    codes = unpack_nibbles(weight.data)
    return ((codes[:, 0::2] << 4) | codes[:, 1::2]).contiguous()


def check_shape(weight: QuantizedWeight) -> None:
    rows, columns = weight.shape
    if weight.format == "int4" and (rows % _INT4_N_MULTIPLE or columns % (INT4_INNER_K_TILES * 16)):
        raise QuantizationUnsupported(
            f"the int4 GPU kernel needs N a multiple of {_INT4_N_MULTIPLE} and K of {INT4_INNER_K_TILES * 16}, "
            f"got a {rows}x{columns} weight"
        )
    if weight.format == "int8" and columns % 16:
        raise QuantizationUnsupported(f"the int8 kernel needs K a multiple of 16, got a {rows}x{columns} weight")


def unsupported_message(format: str, device: torch.device, reason: str) -> str:
    """What a user reads when `format` cannot run on `device`, and what runs instead."""
    return (
        f"{format} has no kernel on {device} with torch {torch.__version__} ({reason}). "
        f"On {device.type} run unquantized (dtype bfloat16 or float16), or run {format} on the CPU "
        "(device cpu), where csm ships its kernels"
    )


_checked: dict[tuple[str, str], str | None] = {}
_checked_lock = threading.Lock()


def device_linear(weight: QuantizedWeight) -> DeviceQuantizedLinear:
    """The GPU module of `weight` (its tensors already on the device), once the device has shown
    that it runs the kernel right; else `QuantizationUnsupported`."""
    device = weight.data.device
    problem = kernel_problem(weight.format, device, weight.group_size)
    if problem is not None:
        raise QuantizationUnsupported(unsupported_message(weight.format, device, problem))
    return DeviceQuantizedLinear(weight)


def kernel_problem(format: str, device: torch.device, group_size: int | None = None) -> str | None:
    """None if `format`'s kernel runs on `device` and agrees with the dequantized product, else why not.

    Tried once per device type, format and group size, on a small random weight."""
    key = (str(device), f"{format}/{group_size}")
    with _checked_lock:
        if key not in _checked:
            _checked[key] = _try_kernel(format, device, group_size)
        return _checked[key]


def _try_kernel(format: str, device: torch.device, group_size: int | None) -> str | None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=generator).to(torch.bfloat16)
    x = torch.randn(3, 256, generator=generator).to(torch.bfloat16)
    quantized = quantize(weight, format) if group_size is None else quantize(weight, format, group_size)
    expected = F.linear(x.float(), dequantize(quantized, torch.float32))
    try:
        moved = QuantizedWeight(
            quantized.format,
            quantized.data.to(device),
            quantized.scales.to(device),
            None if quantized.zeros is None else quantized.zeros.to(device),
        )
        got = DeviceQuantizedLinear(moved)(x.to(device)).float().cpu()
    except (RuntimeError, NotImplementedError, TypeError) as error:
        # The first sentence: the dispatcher goes on to list every backend it knows.
        return str(error).split(". ")[0].splitlines()[0] if str(error) else type(error).__name__
    error = (got - expected).abs().max() / expected.abs().max()
    if not error < 0.02:
        return f"its products differ from the dequantized weight's by {float(error):.1%}"
    return None
