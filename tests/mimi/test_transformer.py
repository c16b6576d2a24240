"""The attention window and RoPE of Mimi's transformer, checked on small inputs."""

from __future__ import annotations

import torch

from csm.mimi import MimiConfig
from csm.mimi.transformer import Transformer, apply_rope, rope_rotations


def one_layer_transformer() -> Transformer:
    torch.manual_seed(0)
    transformer = Transformer(MimiConfig(dim=128, num_layers=1, num_heads=2, ffn_dim=256)).eval()
    return transformer


def test_each_step_sees_exactly_the_last_250_steps():
    transformer = one_layer_transformer()
    x = torch.randn(1, 128, 300)
    changed = x.clone()
    changed[..., 0] = torch.randn(128)
    with torch.no_grad():
        delta = (transformer(changed) - transformer(x)).abs().amax(dim=1)[0]
    assert (delta[1:250] > 1e-4).all()  # steps 1..249 still see step 0
    assert (delta[250:] == 0).all()  # step 250 and later do not


def test_rope_rotates_interleaved_pairs():
    rotations = rope_rotations(3, 1, 4, 10000.0, torch.device("cpu"))
    x = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 1, 4)
    rotated = apply_rope(x, rotations).flatten()
    angles = 3 * torch.tensor([1.0, 10000.0**-0.5])
    expected = torch.stack([angles[0].cos(), angles[0].sin(), -angles[1].sin(), angles[1].cos()])
    assert torch.allclose(rotated, expected, atol=1e-6)
