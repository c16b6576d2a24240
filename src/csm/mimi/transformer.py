"""Mimi's causal transformer: pre-norm layers with layer scale, interleaved RoPE and a
sliding attention window, callable on a whole sequence or chunk by chunk with a KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from csm.mimi.config import MimiConfig


@dataclass
class KVCache:
    """Keys and values of the last `window - 1` steps, [B, heads, window - 1, head_dim]."""

    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class TransformerState:
    """Streaming state, per batch row: the position of the next step, and the positions of the
    cached steps (-1 for an empty slot, which no query sees), shared by every layer's cache."""

    caches: list[KVCache]
    positions: torch.Tensor  # [B] int64
    cached_positions: torch.Tensor  # [B, window - 1] int64

    def reset(self, rows: torch.Tensor) -> None:
        """Start the given batch rows (an index tensor) afresh; the others keep their history."""
        self.positions[rows] = 0
        self.cached_positions[rows] = -1


def rope_tables(start: int, length: int, head_dim: int, base: float, device: torch.device):
    """cos and sin [length, head_dim // 2] of the rotation angles at positions start.."""
    return rope_tables_at(torch.arange(start, start + length, device=device), head_dim, base)


def rope_tables_at(positions: torch.Tensor, head_dim: int, base: float):
    """cos and sin [*positions.shape, head_dim // 2] of the rotation angles at `positions`."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, heads, T, head_dim]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def window_mask(queries: int, keys: int, window: int, device: torch.device) -> torch.Tensor:
    """True where a query may attend: the last `queries` of `keys` positions, each looking at
    itself and the `window - 1` steps before it."""
    query_pos = torch.arange(keys - queries, keys, device=device)[:, None]
    key_pos = torch.arange(keys, device=device)[None, :]
    delta = query_pos - key_pos
    return (delta >= 0) & (delta < window)


def streaming_mask(cached: torch.Tensor, queries: torch.Tensor, window: int) -> torch.Tensor:
    """[B, 1, T, window - 1 + T]: True where query t of a row may attend to a cached step or to
    one of the chunk's own steps, given their positions (cached [B, window - 1], -1 where
    empty; queries [B, T])."""
    keys = torch.cat([cached, queries], dim=1)
    delta = queries[:, :, None] - keys[:, None, :]
    return ((keys >= 0)[:, None, :] & (delta >= 0) & (delta < window))[:, None]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.in_proj = nn.Linear(dim, 3 * dim, bias=False)  # q, k, v stacked
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None, mask: torch.Tensor
    ) -> torch.Tensor:
        q, k, v = self.in_proj(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k = torch.cat([cache.keys, k], dim=2)
            v = torch.cat([cache.values, v], dim=2)
            cache.keys, cache.values = k[:, :, -(self.window - 1) :], v[:, :, -(self.window - 1) :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class TransformerLayer(nn.Module):
    def __init__(self, config: MimiConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, eps=1e-5)
        self.attn = Attention(config.dim, config.num_heads, config.window)
        self.attn_scale = nn.Parameter(torch.ones(config.dim))
        self.norm2 = nn.LayerNorm(config.dim, eps=1e-5)
        self.linear1 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.linear2 = nn.Linear(config.ffn_dim, config.dim, bias=False)
        self.mlp_scale = nn.Parameter(torch.ones(config.dim))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None, mask: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.attn_scale * self.attn(self.norm1(x), cos, sin, cache, mask)
        return x + self.mlp_scale * self.linear2(F.gelu(self.linear1(self.norm2(x))))


class Transformer(nn.Module):
    """Maps [B, dim, T] latents to [B, dim, T] (channels first, like the convolutions)."""

    def __init__(self, config: MimiConfig):
        super().__init__()
        self.config = config
        self.rope_base = config.rope_base
        self.head_dim = config.dim // config.num_heads
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_layers))

    def forward(self, x: torch.Tensor, state: TransformerState | None = None) -> torch.Tensor:
        x = x.transpose(1, 2)
        steps = x.shape[1]
        window = self.config.window
        if state is None:
            cos, sin = rope_tables(0, steps, self.head_dim, self.rope_base, x.device)
            mask = window_mask(steps, steps, window, x.device)
        else:
            positions = state.positions[:, None] + torch.arange(steps, device=x.device)
            cos, sin = rope_tables_at(positions[:, None], self.head_dim, self.rope_base)
            mask = streaming_mask(state.cached_positions, positions, window)
            state.cached_positions = torch.cat([state.cached_positions, positions], dim=1)[:, -(window - 1) :]
            state.positions = state.positions + steps
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if state is None else state.caches[i], mask)
        return x.transpose(1, 2)

    def new_state(self, batch_size: int) -> TransformerState:
        """A fresh streaming state for `batch_size` rows: empty caches, every row at position 0."""
        weight = self.layers[0].attn.in_proj.weight
        slots = self.config.window - 1
        shape = (batch_size, self.config.num_heads, slots, self.head_dim)
        caches = [KVCache(weight.new_zeros(shape), weight.new_zeros(shape)) for _ in self.layers]
        positions = torch.zeros(batch_size, dtype=torch.long, device=weight.device)
        cached = torch.full((batch_size, slots), -1, dtype=torch.long, device=weight.device)
        return TransformerState(caches, positions, cached)
