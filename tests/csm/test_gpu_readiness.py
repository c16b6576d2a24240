"""What a GPU needs, checked on the CPU where it can be: the quantized GPU modules and their
refusal, one fused product off the CPU, the embedding without embedding_bag; and on CUDA
itself (marked gpu) the quantized kernels against the dequantized weights."""

import pytest
import torch
import torch.nn.functional as F

from csm import device_quantize
from csm.device_quantize import DeviceQuantizedLinear, QuantizationUnsupported, device_linear, high_nibble_first
from csm.inference import FusedLinear
from csm.kernels import LINEAR, MV, PACKED
from csm.quantize import QuantizedLinear, dequantize, quantize, unpack_nibbles
from tests.csm.test_model import text_prompt
from tests.factories.csm import random_model, tiny_config


def random_weight(rows=96, columns=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, columns, generator=generator) / columns**0.5).to(torch.bfloat16)


def test_the_device_int8_module_computes_what_the_cpu_kernel_does():
    """Same kernel and layout as on the CPU (`_weight_int8pack_mm` runs here too): any rows."""
    weight = quantize(random_weight(), "int8")
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    assert torch.equal(DeviceQuantizedLinear(weight)(x), QuantizedLinear(weight)(x))


def test_int4_is_packed_for_the_gpu_with_the_even_column_in_the_high_nibble():
    codes = torch.randint(16, (8, 32), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    stored = quantize(random_weight(8, 64), "int4")  # any int4 weight: its data replaced below
    stored = type(stored)("int4", codes[:, 0::2] | (codes[:, 1::2] << 4), stored.scales, stored.zeros)
    assert torch.equal(unpack_nibbles(stored.data), codes)
    packed = high_nibble_first(stored)
    assert torch.equal(packed >> 4, codes[:, 0::2]) and torch.equal(packed & 0xF, codes[:, 1::2])


def test_a_format_without_a_kernel_on_the_device_is_refused_naming_what_runs():
    """The CPU build of torch has no `_convert_weight_to_int4pack` for the CPU: the same refusal
    a GPU without the int4 kernel gives."""
    with pytest.raises(QuantizationUnsupported) as refused:
        device_linear(quantize(random_weight(), "int4"))
    message = str(refused.value)
    assert message.startswith(f"int4 has no kernel on cpu with torch {torch.__version__} (")
    assert "run unquantized (dtype bfloat16 or float16), or run int4 on the CPU (device cpu)" in message
    assert "only available for these backends" not in message  # the dispatcher's list is cut


def test_a_shape_the_gpu_int4_kernel_cannot_tile_is_refused():
    with pytest.raises(QuantizationUnsupported, match="N a multiple of 8 and K of 128, got a 2051x1024"):
        device_quantize.check_shape(quantize(random_weight(2051, 1024), "int4"))


@pytest.mark.parametrize("kernel", [MV, LINEAR])
def test_a_fused_linear_runs_one_product_off_the_cpu(kernel):
    """On a GPU one launch beats three; only the CPU's float32 (the oracle's) runs them apart."""
    rows = torch.empty(2, 3, 8, device="meta")
    assert not FusedLinear._separately(rows, kernel)
    assert FusedLinear._separately(torch.zeros(2, 3, 8), kernel)  # float32 on the CPU
    assert FusedLinear._separately(torch.zeros(2, 3, 8, dtype=torch.bfloat16), MV)
    assert not FusedLinear._separately(torch.zeros(2, 3, 8, dtype=torch.bfloat16), PACKED)
    assert not FusedLinear._separately(torch.zeros(1, 1, 8, dtype=torch.bfloat16), kernel)


def test_the_embedding_without_embedding_bag_sums_the_same_rows(monkeypatch):
    """Older torch has no MPS embedding_bag: the gathered rows, summed, are the same embedding
    (up to float32 rounding: the two sum the rows in different orders)."""
    model = random_model(tiny_config(), seed=3)
    tokens, mask = text_prompt(6, seed=1)
    tokens[2:4, :32] = torch.randint(2051, (2, 32))
    mask[2:4, :32] = True
    with_bag = model.embed(tokens[None], mask[None])
    monkeypatch.setattr("csm.model.embedding_bag_runs_on", lambda device: False)
    torch.testing.assert_close(model.embed(tokens[None], mask[None]), with_bag, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("format", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 5])
def test_cuda_quantized_kernels_match_the_dequantized_weight(format, rows):
    weight = quantize(random_weight(3072, 2048).cuda(), format)
    x = torch.randn(rows, 2048, device="cuda").to(torch.bfloat16)
    module = device_linear(weight)
    expected = F.linear(x.float(), dequantize(weight, torch.float32))
    error = (module(x).float() - expected).abs().max() / expected.abs().max()
    assert error < 0.02
