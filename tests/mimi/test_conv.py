"""The causal convolutions on small random signals, against PyTorch's own convolutions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from csm.mimi.conv import CausalConv1d, CausalConvTranspose1d, ConvState


@pytest.mark.parametrize("pad_mode", ["constant", "replicate"])
@pytest.mark.parametrize(("kernel", "stride"), [(4, 2), (1, 1)], ids=["strided", "pointwise"])
# Up to 512 output steps a product over the input's windows, beyond that oneDNN time-major.
@pytest.mark.parametrize("steps", [7, 1400], ids=["windows", "time-major"])
def test_causal_conv_pads_on_the_left_and_completes_the_last_window(pad_mode, kernel, stride, steps):
    torch.manual_seed(0)
    conv = CausalConv1d(8, 6, kernel, stride, pad_mode=pad_mode)
    x = torch.randn(2, 8, steps)
    padded = F.pad(x, (kernel - stride, -steps % stride), mode=pad_mode)
    expected = F.conv1d(padded, conv.weight, conv.bias, stride=stride)
    with torch.no_grad():
        assert torch.allclose(conv(x), expected, atol=1e-6)


@pytest.mark.parametrize(
    ("groups", "steps"), [(1, 5), (1, 700), (2, 300), (8, 300)], ids=["dense", "dense-long", "grouped", "depthwise"]
)
def test_transposed_conv_equals_pytorch_and_keeps_its_layout(groups, steps):
    torch.manual_seed(1)
    conv = CausalConvTranspose1d(8, 8, 6, 3, groups=groups)
    weight, bias = torch.randn(8, 8 // groups, 6), torch.randn(8)
    conv.load_state_dict({"weight": weight, "bias": bias})
    assert torch.equal(conv.state_dict()["weight"], weight)
    assert torch.equal(conv.state_dict()["bias"], bias)

    x = torch.randn(2, 8, steps)
    expected = F.conv_transpose1d(x, weight, bias, stride=3, groups=groups)
    with torch.no_grad():
        assert torch.allclose(conv(x), expected[..., : 3 * steps], atol=1e-5)
        state = ConvState()
        chunks = [conv(chunk, state) for chunk in torch.split(x, [1, 2, steps - 3], dim=-1)]
    assert torch.allclose(torch.cat(chunks, dim=-1), expected[..., : 3 * steps], atol=1e-5)


def test_transposed_conv_needs_a_kernel_multiple_of_the_stride():
    with pytest.raises(ValueError, match="multiple of stride"):
        CausalConvTranspose1d(4, 4, 5, 2)
