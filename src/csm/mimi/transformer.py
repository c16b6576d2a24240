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
    """Keys and values of recent steps in a ring of slots, [B, heads, slots, head_dim]."""

    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class TransformerState:
    """Streaming state: per layer, a ring of cached keys and values that every batch row steps
    through together; per row, the position of its next step and the position held in each
    slot (-1 for an empty slot, which no query sees). A chunk's steps are written into the ring
    before its queries attend to the whole ring, so it holds `window - 1` steps plus a chunk."""

    caches: list[KVCache]
    positions: torch.Tensor  # [B] int64
    slot_positions: torch.Tensor  # [B, slots] int64
    next_slot: int = 0  # where the next step goes, the same in every row

    @property
    def slots(self) -> int:
        return self.slot_positions.shape[1]

    def reset(self, rows: torch.Tensor) -> None:
        """Start the given batch rows (an index tensor) afresh; the others keep their history."""
        self.positions[rows] = 0
        self.slot_positions[rows] = -1

    def leading(self, rows: int) -> TransformerState:
        """The state of batch rows 0 .. rows-1 alone, views of this one's tensors: a step of it
        writes its rows here, and `store_leading` takes back where the ring goes next."""
        caches = [KVCache(cache.keys[:rows], cache.values[:rows]) for cache in self.caches]
        return TransformerState(caches, self.positions[:rows], self.slot_positions[:rows], self.next_slot)

    def store_leading(self, part: TransformerState) -> None:
        if part.slots != self.slots:
            raise RuntimeError("a step of leading rows cannot grow the ring; step every row")
        self.next_slot = part.next_slot

    def make_room(self, slots: int) -> None:
        """Grow the ring to `slots`, oldest step first, so the next writes replace the oldest."""
        if slots <= self.slots:
            return
        order = (self.next_slot + torch.arange(self.slots, device=self.positions.device)) % self.slots
        extra = slots - self.slots
        for cache in self.caches:
            cache.keys = F.pad(cache.keys[:, :, order], (0, 0, 0, extra))
            cache.values = F.pad(cache.values[:, :, order], (0, 0, 0, extra))
        self.next_slot = self.slots
        self.slot_positions = F.pad(self.slot_positions[:, order], (0, extra), value=-1)

    def advance(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Claim slots for the next `steps` steps of every row: (their slot indices [steps],
        their positions [B, steps])."""
        device = self.positions.device
        index = (self.next_slot + torch.arange(steps, device=device)) % self.slots
        positions = self.positions[:, None] + torch.arange(steps, device=device)
        self.slot_positions[:, index] = positions
        self.next_slot = (self.next_slot + steps) % self.slots
        self.positions += steps
        return index, positions


def rope_rotations(start: int, length: int, head_dim: int, base: float, device: torch.device) -> torch.Tensor:
    """cos + i sin [length, head_dim // 2] of the rotation angles at positions start.."""
    return rope_rotations_at(torch.arange(start, start + length, device=device), head_dim, base)


def rope_rotations_at(positions: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """cos + i sin [*positions.shape, head_dim // 2] (complex64) of the rotation angles at `positions`."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [..., B, heads, T, head_dim]: each pair is
    a complex number multiplied by its rotation (one operation instead of eight)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotations).flatten(-2).to(x.dtype)


def window_mask(queries: int, keys: int, window: int, device: torch.device) -> torch.Tensor:
    """True where a query may attend: the last `queries` of `keys` positions, each looking at
    itself and the `window - 1` steps before it."""
    query_pos = torch.arange(keys - queries, keys, device=device)[:, None]
    key_pos = torch.arange(keys, device=device)[None, :]
    delta = query_pos - key_pos
    return (delta >= 0) & (delta < window)


def streaming_mask(slot_positions: torch.Tensor, queries: torch.Tensor, window: int) -> torch.Tensor:
    """[B, 1, T, slots]: True where query t of a row (queries [B, T], positions) may attend to a
    slot (slot_positions [B, slots], -1 where empty): itself and the `window - 1` steps before."""
    delta = queries[:, :, None] - slot_positions[:, None, :]
    return ((slot_positions >= 0)[:, None, :] & (delta >= 0) & (delta < window))[:, None]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the additive one (0 or -inf) that attention would make of it
    in every layer: made once per call instead."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.in_proj = nn.Linear(dim, 3 * dim, bias=False)  # q, k, v stacked
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rotations: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache | None,
        slots: torch.Tensor | None,
    ) -> torch.Tensor:
        """`slots`: where this chunk's keys and values go in `cache` (streaming only)."""
        qkv = self.in_proj(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(qkv[:2], rotations)  # one rotation for both: half the small operations
        v = qkv[2]
        if cache is not None:
            cache.keys.index_copy_(2, slots, k)
            cache.values.index_copy_(2, slots, v)
            k, v = cache.keys, cache.values
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
        self,
        x: torch.Tensor,
        rotations: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache | None,
        slots: torch.Tensor | None,
    ) -> torch.Tensor:
        x = x + self.attn_scale * self.attn(self.norm1(x), rotations, mask, cache, slots)
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
            rotations = rope_rotations(0, steps, self.head_dim, self.rope_base, x.device)
            mask = _additive(window_mask(steps, steps, window, x.device), x.dtype)
            for layer in self.layers:
                x = layer(x, rotations, mask, None, None)
            return x.transpose(1, 2)
        state.make_room(window - 1 + steps)
        slots, positions = state.advance(steps)
        rotations = rope_rotations_at(positions[:, None], self.head_dim, self.rope_base)
        mask = _additive(streaming_mask(state.slot_positions, positions, window), x.dtype)
        for layer, cache in zip(self.layers, state.caches, strict=True):
            x = layer(x, rotations, mask, cache, slots)
        return x.transpose(1, 2)

    def new_state(self, batch_size: int) -> TransformerState:
        """A fresh streaming state for `batch_size` rows, every row at position 0, with room
        for chunks of one frame (it grows for longer ones)."""
        weight = self.layers[0].attn.in_proj.weight
        slots = self.config.window - 1 + self.config.frame_stride
        shape = (batch_size, self.config.num_heads, slots, self.head_dim)
        caches = [KVCache(weight.new_zeros(shape), weight.new_zeros(shape)) for _ in self.layers]
        positions = torch.zeros(batch_size, dtype=torch.long, device=weight.device)
        slot_positions = torch.full((batch_size, slots), -1, dtype=torch.long, device=weight.device)
        return TransformerState(caches, positions, slot_positions)
