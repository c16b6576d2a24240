"""Weight-only int8/int4 linears: the CPU kernels against the dequantized reference, and their traps."""

import pytest
import torch

from csm.quantize import INT4_GROUP_SIZE, QuantizedLinear, QuantizedWeight, concatenate, dequantize, quantize, unpack_nibbles

# Output of the kernels is bf16: a few bf16 steps of the result's magnitude (~3 here).
TOLERANCE = {"atol": 0.05, "rtol": 0.02}


def weight(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)) / columns**0.5


def activations(rows: int, columns: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def reference(x: torch.Tensor, quantized: QuantizedWeight) -> torch.Tensor:
    return (x.float() @ dequantize(quantized, torch.float32).t()).to(torch.bfloat16)


@pytest.mark.parametrize("format", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_kernels_match_the_dequantized_reference(format, rows):
    quantized = quantize(weight(384, 256), format)
    linear = QuantizedLinear(quantized)
    assert linear.packed
    x = activations(rows, 256)
    torch.testing.assert_close(linear(x), reference(x, quantized), **TOLERANCE)
    torch.testing.assert_close(QuantizedLinear(quantized, packed=False)(x), reference(x, quantized), **TOLERANCE)


@pytest.mark.parametrize("format", ["int8", "int4"])
def test_quantization_error_is_what_the_format_allows(format):
    w = weight(64, 256)
    # Groups of very different ranges: a bound by the whole matrix's range would hide a group
    # quantized with another group's step.
    w[:, :64] *= 8
    error = (dequantize(quantize(w, format), torch.float32) - w).abs()
    # Half a step: per-channel absmax / 127 (int8), each group's range / 15 (int4), plus bf16 scale rounding.
    if format == "int8":
        step = w.abs().amax(dim=1, keepdim=True) / 127
    else:
        groups = w.view(64, -1, INT4_GROUP_SIZE)
        step = ((groups.amax(dim=-1) - groups.amin(dim=-1)) / 15).repeat_interleave(INT4_GROUP_SIZE, dim=1)
    assert (error <= 0.51 * step + 1e-3).all()


def test_int4_codes_are_stored_two_a_byte_in_a_portable_layout():
    quantized = quantize(weight(32, 128), "int4")
    assert quantized.data.dtype == torch.uint8 and quantized.data.shape == (32, 64)
    codes = unpack_nibbles(quantized.data)
    assert codes.shape == (32, 128) and int(codes.max()) <= 15
    assert torch.equal(codes[:, 0::2], quantized.data & 0xF)
    assert quantized.scales.shape == quantized.zeros.shape == (32, 2) and quantized.group_size == 64


def test_a_misaligned_activation_is_copied_not_crashed_on():
    """The int8 kernel crashes on inputs that are not 32-byte aligned, e.g. a view at an offset."""
    quantized = quantize(weight(64, 256), "int8")
    storage = activations(1, 257)
    x = storage[0, 1:][None]
    assert x.data_ptr() % 32
    torch.testing.assert_close(QuantizedLinear(quantized)(x), reference(x, quantized), **TOLERANCE)


def test_shapes_the_kernels_cannot_take_are_dequantized():
    """int8: K not a multiple of 16 gives silently wrong values; int4: N must be a multiple of 16."""
    for format, shape in (("int8", (32, 200)), ("int4", (40, 128))):
        quantized = quantize(weight(*shape), format)
        linear = QuantizedLinear(quantized)
        assert not linear.packed
        x = activations(2, shape[1])
        torch.testing.assert_close(linear(x), reference(x, quantized), **TOLERANCE)
        with pytest.raises(ValueError, match="CPU kernel cannot take"):
            QuantizedLinear(quantized, packed=True)


@pytest.mark.parametrize("format", ["int8", "int4"])
def test_concatenated_rows_are_the_parts_rows(format):
    parts = [quantize(weight(rows, 256, seed=rows), format) for rows in (64, 32, 32)]
    x = activations(1, 256)
    fused = QuantizedLinear(concatenate(parts))(x)
    assert torch.equal(fused, torch.cat([QuantizedLinear(part)(x) for part in parts], dim=-1))
    assert torch.equal(dequantize(concatenate(parts)), torch.cat([dequantize(part) for part in parts]))


def test_activations_must_be_bfloat16():
    with pytest.raises(TypeError, match="takes bfloat16 activations"):
        QuantizedLinear(quantize(weight(16, 64), "int8"))(torch.zeros(1, 64))
    with pytest.raises(ValueError, match="unknown quantization 'int2'"):
        quantize(weight(16, 64), "int2")
