"""Dynamic int8 (int8 weights x int8 activations): every route against the dequantized reference,
with error bounds computed here from each row's activation scale and each channel's weight scale."""

import copy
import gc

import pytest
import torch

from csm.inference import quantized_linear
from csm.int8_dynamic import DynamicInt8Linear, fbgemm_available
from csm.loading import load_for_generation
from csm.quantize import QuantizedWeight, concatenate, dequantize, quantize, stored_format
from tests.csm.test_inference import frames
from tests.csm.test_model import text_prompt
from tests.factories.csm import tiny_config, write_csm_checkpoint

ROUTES = ["fbgemm", "int_mm", "dequantized"] if fbgemm_available() else ["int_mm", "dequantized"]
# The integer routes; "dequantized" is the bf16 fallback off the CPU.
INTEGER_ROUTES = [route for route in ROUTES if route != "dequantized"]


def weight(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)) / columns**0.5


def activations(rows: int, columns: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))
    # Rows of very different magnitudes: a scale shared by all rows would fail the bounds.
    return (x * torch.logspace(-2, 1, rows)[:, None]).to(torch.bfloat16)


def check_within_bounds(out: torch.Tensor, x: torch.Tensor, quantized: QuantizedWeight, *, spread: bool = True) -> None:
    """The error of quantizing each activation row, against the float product with the int8 weight.

    Per row m, every activation is off by at most its step, absmax(x[m]) / 127 (symmetric per row:
    half of that; one affine grid over [-1, 1] after scaling the row to its absmax: 2 / 255 of it,
    less than 1 / 127). So output (m, n) is off by at most
    step[m] * weight_scale[n] * sum_k |q[n, k]|, plus bf16 rounding of the output; and the RMS
    error, for roundings spread over the step (`spread`: not for constant inputs), by about
    step[m] / sqrt(12) * |w[n]|.
    """
    reference = x.float() @ dequantize(quantized, torch.float32).t()
    error = (out.float() - reference).abs()
    step = x.float().abs().amax(dim=-1, keepdim=True) / 127
    scales = quantized.scales.float()
    worst = step * (scales * quantized.data.float().abs().sum(dim=1)) + reference.abs() / 2**8 + 1e-6
    assert (error <= worst).all(), f"worst excess {float((error / worst).max()):.2f}x the bound"
    if not spread:
        return
    typical = step / 12**0.5 * (scales * quantized.data.float().norm(dim=1))
    rounding = float((reference / 2**8).square().mean())
    assert float(error.square().mean()) <= 1.5**2 * float(typical.square().mean()) + rounding


@pytest.mark.parametrize("route", INTEGER_ROUTES)
@pytest.mark.parametrize("rows", [1, 3, 8, 17])
def test_integer_routes_stay_within_the_quantization_bounds(route, rows):
    quantized = quantize(weight(384, 256), "int8")
    x = activations(rows, 256)
    out = DynamicInt8Linear(quantized, route=route)(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 384)
    check_within_bounds(out, x, quantized)


@pytest.mark.parametrize("route", INTEGER_ROUTES)
@pytest.mark.parametrize("shape", [(40, 200), (37, 24), (2051, 72), (16, 8)])
def test_shapes_no_kernel_likes_are_right(route, shape):
    """K not a multiple of 16 (the weight-only kernel's trap), odd N and rows, tiny K."""
    rows, columns = 5, shape[1]
    quantized = quantize(weight(*shape), "int8")
    x = activations(rows, columns)
    check_within_bounds(DynamicInt8Linear(quantized, route=route)(x), x, quantized)


@pytest.mark.parametrize("route", ROUTES)
def test_misaligned_and_strided_inputs_give_the_same_product(route):
    linear = DynamicInt8Linear(quantize(weight(64, 256), "int8"), route=route)
    storage = activations(3, 257 * 2)
    x = storage[:, 1:257]  # a view at an odd offset, rows strided
    assert x.data_ptr() % 32 and not x.is_contiguous()
    assert torch.equal(linear(x), linear(x.contiguous()))


@pytest.mark.parametrize("route", INTEGER_ROUTES)
def test_batched_shapes_and_zero_rows(route):
    quantized = quantize(weight(48, 64), "int8")
    linear = DynamicInt8Linear(quantized, route=route)
    x = activations(6, 64).view(2, 3, 64).clone()
    x[1, 2] = 0
    out = linear(x)
    assert out.shape == (2, 3, 48)
    assert torch.equal(out[1, 2], torch.zeros(48, dtype=torch.bfloat16))
    check_within_bounds(out.view(6, 48), x.view(6, 64), quantized)


def test_saturating_pairs_are_exact():
    """Full-scale activations against full-scale weights of one sign: the 8-bit pair products
    overflow 16-bit sums on CPUs without VNNI, which the fbgemm route must detect and avoid."""
    codes = torch.full((32, 128), 127, dtype=torch.int8)
    codes[1::2] = -127
    quantized = QuantizedWeight("int8", codes, torch.full((32,), 1 / 128, dtype=torch.bfloat16))
    x = torch.ones(2, 128, dtype=torch.bfloat16)
    x[:, 0] = 0
    for route in INTEGER_ROUTES:
        check_within_bounds(DynamicInt8Linear(quantized, route=route)(x), x, quantized, spread=False)


@pytest.mark.parametrize("route", ROUTES)
def test_concatenated_rows_are_the_parts_rows(route):
    """Fused q/k/v and w1|w3 stay bit-identical to separate products: each output channel's sum
    depends on the row's quantization only."""
    parts = [quantize(weight(rows, 256, seed=rows), "int8") for rows in (64, 32, 32)]
    x = activations(4, 256)
    fused = DynamicInt8Linear(concatenate(parts), route=route)(x)
    assert torch.equal(fused, torch.cat([DynamicInt8Linear(part, route=route)(x) for part in parts], dim=-1))


@pytest.mark.parametrize("route", INTEGER_ROUTES)
@pytest.mark.parametrize("rows", [2, 8, 17])
def test_each_row_is_computed_as_if_alone(route, rows):
    """A row's product does not depend on the rows beside it (the engine's batch), bit for bit."""
    linear = DynamicInt8Linear(quantize(weight(64, 256), "int8"), route=route)
    x = activations(rows, 256)
    assert torch.equal(linear(x), torch.cat([linear(row[None]) for row in x]))


def test_a_model_decodes_each_row_as_if_alone(tmp_path):
    """As `test_inference` checks for the weight-only modes: batched rows give the frames each
    gives alone, so the engine's requests do not depend on each other."""
    model = load_for_generation(write_csm_checkpoint(tmp_path, tiny_config(), seed=3), quantize="int8-dynamic")
    assert isinstance(model.decoder.layers[1].attn.qkv_proj.linear, DynamicInt8Linear)
    prompts = [text_prompt(6, seed=2), text_prompt(6, seed=3), text_prompt(6, seed=4)]
    alone = [frames(model, [prompt], seed=row) for row, prompt in enumerate(prompts)]
    assert torch.equal(frames(model, prompts), torch.cat(alone))


def test_the_mode_is_chosen_by_name_and_stores_int8():
    quantized = quantize(weight(32, 64), "int8-dynamic")
    assert quantized.format == stored_format("int8-dynamic") == "int8"
    assert isinstance(quantized_linear(quantized, "int8-dynamic"), DynamicInt8Linear)
    assert not isinstance(quantized_linear(quantized, "int8"), DynamicInt8Linear)
    with pytest.raises(ValueError, match="runs int8 weights, not int4"):
        quantized_linear(quantize(weight(32, 64), "int4"), "int8-dynamic")
    with pytest.raises(ValueError, match="unknown route"):
        DynamicInt8Linear(quantized, route="vnni")
    with pytest.raises(TypeError, match="takes bfloat16 activations"):
        DynamicInt8Linear(quantized)(torch.zeros(1, 64))


@pytest.mark.skipif(not fbgemm_available(), reason="the fbgemm route needs PyTorch's x86 quantized engine")
def test_a_compiled_graph_calls_the_fbgemm_route_as_eager_does():
    """Compiled graphs reach the packed weight through a table of live linears: a copy (a
    deep-copied model) must find its own weight there after the original is gone."""
    original = DynamicInt8Linear(quantize(weight(48, 64), "int8"))
    assert original.route == "fbgemm"
    x = activations(3, 64)
    expected = original(x)
    linear = copy.deepcopy(original)
    del original
    gc.collect()
    assert torch.equal(linear(x), expected)
    compiled = torch.compile(linear, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(x), expected)
