"""Dynamic int8: int8 weights times int8 activations, summed in int32 (the "int8-dynamic" mode).

PyTorch's weight-only int8 kernel (`csm.quantize.QuantizedLinear`, mode "int8") turns every
weight back into a float and multiplies in floating point: on a CPU that conversion, not the
memory, bounds it, and with several rows (the engine's batch, a prefill chunk) it is slower
than bf16. Here, as in ggml's Q8_0, each activation row is quantized to 8 bits when the product
runs, and the products of integers are summed in int32 (VNNI on x86), then scaled back:

    out[m, n] = row_scale[m] * weight_scale[n] * sum_k xq[m, k] * wq[n, k]

The weights are those of "int8" (`QuantizedWeight`, per output channel, symmetric), so one
`csm quantize --to int8` folder serves both modes. Routes, fastest first (measured on CSM's
shapes at 1, 8 and 128 rows: docs/quantization.md, benchmarks/bench_int8_kernels.py):

- "fbgemm": `quantized::linear_dynamic` with the weight prepacked for FBGEMM (x86). It
  quantizes its whole input with one affine 8-bit grid; each row is first divided by its own
  absolute maximum and columns holding -1 and 1 (with zero weights) are added, so the grid is
  always [-1, 1] and every row is quantized per row, exactly as alone; the output row is
  multiplied back. It is opaque to
  torch.compile, so a compiled graph calls it through the custom op `csm::int8_dynamic_linear`.
- "int_mm": symmetric per-row int8 activations and `torch._int_mm` (int8 x int8 -> int32), a
  core kernel for CPUs without FBGEMM (ARM) and PyTorch builds without quantized tensors.
- "dequantized": off the CPU, the weight is dequantized to bf16 at every call (correct, not fast).
"""

from __future__ import annotations

import functools
import itertools
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from csm.quantize import QuantizedWeight, dequantize

ROUTES = ("fbgemm", "int_mm", "dequantized")
# A row of zeros is divided by this instead of by its maximum: it stays zero.
_TINY = 1e-30
# The fbgemm route's extra input columns (-1, 1, then zeros; their weights are zero), which
# fix its activation grid at [-1, 1]. 16 keeps K as aligned as it was.
_SPAN_COLUMNS = 16
_SPAN = torch.tensor([-1.0, 1.0] + [0.0] * (_SPAN_COLUMNS - 2))

# The linears of the fbgemm route by handle, for compiled graphs, which cannot hold a packed
# weight (a TorchScript object) but can pass an int to a custom op. Weak: a linear that is
# gone leaves the table.
_LINEARS: weakref.WeakValueDictionary[int, DynamicInt8Linear] = weakref.WeakValueDictionary()
_handles = itertools.count()


class DynamicInt8Linear(nn.Module):
    """A bias-free linear with an int8 weight whose activations are quantized per row at each
    call; activations and output in bf16."""

    def __init__(self, weight: QuantizedWeight, *, route: str | None = None) -> None:
        """`route` forces one of `ROUTES`; by default the fastest one that runs here."""
        super().__init__()
        if weight.format != "int8":
            raise ValueError(f"dynamic int8 takes int8 weights, not {weight.format}")
        self.out_features, self.in_features = weight.shape
        self.route = route or default_route(weight.data.device)
        if self.route not in ROUTES:
            raise ValueError(f"unknown route {self.route!r}: use one of {', '.join(ROUTES)}")
        if self.route == "fbgemm":
            if not fbgemm_available():
                raise ValueError("the fbgemm route needs PyTorch's FBGEMM (x86) quantized engine")
            # Only the packed copy is kept: the plain codes are freed once it is made.
            self.packed = _pack(weight)
            self._register()
        else:
            self.register_buffer("qweight", weight.data, persistent=False)
            self.register_buffer("scales", weight.scales, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            raise TypeError(f"an int8-dynamic linear takes bfloat16 activations, got {x.dtype}")
        rows = x.reshape(-1, self.in_features)
        if self.route == "fbgemm":
            if torch.compiler.is_compiling():
                out = torch.ops.csm.int8_dynamic_linear(rows, self.handle, self.out_features)
            else:
                out = _fbgemm_product(rows, self.packed)
        elif self.route == "int_mm":
            out = _int_mm_product(rows, self.qweight, self.scales)
        else:
            out = F.linear(rows, dequantize(QuantizedWeight("int8", self.qweight, self.scales), x.dtype))
        return out.view(*x.shape[:-1], self.out_features)

    def _register(self) -> None:
        self.handle = next(_handles)
        _LINEARS[self.handle] = self

    def __setstate__(self, state: dict) -> None:
        # A copy (copy.deepcopy, pickle) gets a handle of its own: it must outlive the original.
        super().__setstate__(state)
        if self.route == "fbgemm":
            self._register()

    def extra_repr(self) -> str:
        return f"int8-dynamic, in_features={self.in_features}, out_features={self.out_features}, {self.route}"


def default_route(device: torch.device) -> str:
    if device.type != "cpu":
        return "dequantized"
    return "fbgemm" if fbgemm_available() else "int_mm"


@functools.cache
def fbgemm_available() -> bool:
    """Whether this PyTorch has FBGEMM's dynamic quantized linear (x86 builds) and uses it."""
    engines = torch.backends.quantized.supported_engines
    return torch.backends.quantized.engine in ("x86", "fbgemm") and "fbgemm" in engines


def _pack(weight: QuantizedWeight) -> torch.ScriptObject:
    """FBGEMM's packed weight, with `_SPAN_COLUMNS` zero columns after the codes."""
    rows = weight.shape[0]
    scales = weight.scales.to(torch.float64)  # bf16 values, exactly
    padded = F.pad(weight.data, (0, _SPAN_COLUMNS))
    with warnings.catch_warnings():
        # PyTorch deprecates quantized tensors; this one only carries the codes to the packer.
        warnings.simplefilter("ignore", UserWarning)
        codes = torch._make_per_channel_quantized_tensor(padded, scales, torch.zeros(rows, dtype=torch.int64), 0)
        return torch.ops.quantized.linear_prepack(codes, None)


def _fbgemm_product(rows: torch.Tensor, packed: torch.ScriptObject) -> torch.Tensor:
    count, columns = rows.shape
    # Each row scaled to [-1, 1] by its own absolute maximum, and extra columns holding -1 and
    # 1 (whose weights are zero): FBGEMM's one grid for the whole input then always spans
    # [-1, 1], so every row is quantized exactly as it would be alone (the integer sums are
    # exact, the scaling per element), at the resolution of its own range. Columns, not a
    # row: FBGEMM's one-row product is twice as fast as its two-row one.
    peak = torch.linalg.vector_norm(rows, float("inf"), dim=-1, keepdim=True, dtype=torch.float32).clamp_(min=_TINY)
    scaled = torch.empty(count, columns + _SPAN_COLUMNS, dtype=torch.float32, device=rows.device)
    torch.div(rows, peak, out=scaled[:, :columns])
    scaled[:, columns:] = _SPAN
    out = torch.ops.quantized.linear_dynamic(scaled, packed, _reduce_range())
    return out.mul_(peak).to(torch.bfloat16)


def _int_mm_product(rows: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    step = torch.linalg.vector_norm(rows, float("inf"), dim=-1, keepdim=True, dtype=torch.float32).clamp_(min=_TINY)
    step = step / 127
    quantized = torch.round(rows / step).to(torch.int8)  # |rows / step| <= 127: no clamp needed
    sums = torch._int_mm(quantized, codes.t())
    return (sums * (step * scales.float())).to(torch.bfloat16)


@functools.cache
def _reduce_range() -> bool:
    """Whether FBGEMM must quantize activations to 7 bits here.

    Without VNNI, x86 multiplies 8-bit pairs into 16-bit sums that saturate, which PyTorch
    avoids by giving up a bit of the activations ("reduce_range"). With VNNI the sums are 32-bit
    and the full 8 bits are exact. Asked of the CPU by a product whose pairs would saturate.
    """
    columns, rows = 64, 16
    codes = torch.full((rows, columns), 127, dtype=torch.int8)
    codes[1::2] = -127
    packed = _pack(QuantizedWeight("int8", codes, torch.full((rows,), 1 / 128, dtype=torch.bfloat16)))
    x = torch.zeros(1, columns + _SPAN_COLUMNS)  # the packed weight's zero columns too
    x[0, 1:columns] = 1  # the grid spans [0, 1]: these inputs are code 255
    exact = x[:, :columns] @ (codes.float() / 128).t()
    # Saturated sums would be off by half; float rounding of the scales is far below that.
    return not torch.allclose(torch.ops.quantized.linear_dynamic(x, packed, False), exact, rtol=1e-3)


@torch.library.custom_op("csm::int8_dynamic_linear", mutates_args=())
def _compiled_fbgemm_product(rows: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """The fbgemm route as an op a compiled graph can call (the packed weight by its handle)."""
    return _fbgemm_product(rows, _LINEARS[handle].packed)


@_compiled_fbgemm_product.register_fake
def _(rows: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return rows.new_empty((rows.shape[0], out_features), dtype=torch.bfloat16)
