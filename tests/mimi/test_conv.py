"""The causal convolutions on small random signals, against PyTorch's own convolutions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from csm.mimi.conv import CausalConv1d, CausalConvTranspose1d, ConvState


@pytest.mark.parametrize("pad_mode", ["constant", "replicate"])
@pytest.mark.parametrize(("kernel", "stride"), [(4, 2), (1, 1)], ids=["strided", "pointwise"])
# Up to 512 output steps (and pointwise at any length) a product over the input's windows, beyond that
# oneDNN time-major.
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


@pytest.mark.parametrize("assign", [False, True], ids=["copied", "assigned"])
def test_weights_are_stored_time_major_before_and_after_loading(assign):
    """[out, kernel, in] in memory, the layout the windowed product reads without a copy, also
    when loading assigns the file's own (channels-first) tensors, as `Mimi.from_pretrained` does."""
    plain, transposed = CausalConv1d(8, 6, 4, 2), CausalConvTranspose1d(8, 4, 6, 3)
    assert plain.weight.transpose(1, 2).is_contiguous() and transposed.weight.transpose(1, 2).is_contiguous()
    for conv, weight, bias in (
        (plain, torch.randn(6, 8, 4), torch.randn(6)),
        (transposed, torch.randn(8, 4, 6), torch.randn(4)),
    ):
        conv.load_state_dict({"weight": weight, "bias": bias}, assign=assign)
        assert conv.weight.transpose(1, 2).is_contiguous()
        assert torch.equal(conv.state_dict()["weight"], weight)
