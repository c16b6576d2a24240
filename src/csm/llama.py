"""The Llama-3 decoder that CSM uses twice: as its backbone and as its depth decoder.

Only what inference needs: RMSNorm, Llama-3 scaled RoPE on interleaved pairs, grouped-query
attention over a preallocated KV cache that each step writes in place, and a SwiGLU MLP.
Parameter names follow the original CSM checkpoint (torchtune's), so a state dict of these
modules is an original-layout checkpoint. `FusedAttention` and `FusedMLP` are the inference
form of the attention and the MLP, with their input projections as one module each, which
`csm.inference` swaps in.
"""

from __future__ import annotations

import abc
import itertools
import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from csm import kernels


@dataclass(frozen=True)
class LlamaConfig:
    num_layers: int
    dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_base: float = 500_000.0
    # Llama-3 RoPE scaling, in the original (torchtune) parametrisation.
    rope_scale_factor: float = 32.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_old_context_len: int = 8192


FLAVORS: dict[str, LlamaConfig] = {
    "llama-1B": LlamaConfig(num_layers=16, dim=2048, num_heads=32, num_kv_heads=8, head_dim=64, ffn_dim=8192),
    "llama-100M": LlamaConfig(num_layers=4, dim=1024, num_heads=8, num_kv_heads=2, head_dim=128, ffn_dim=8192),
}


def rope_frequencies(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies of each rotated pair, with Llama-3's long-context scaling."""
    freqs = 1.0 / config.rope_base ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim)
    wavelen = 2 * math.pi / freqs
    low_freq_wavelen = config.rope_old_context_len / config.rope_low_freq_factor
    high_freq_wavelen = config.rope_old_context_len / config.rope_high_freq_factor
    smooth = (config.rope_old_context_len / wavelen - config.rope_low_freq_factor) / (
        config.rope_high_freq_factor - config.rope_low_freq_factor
    )
    blended = (1 - smooth) * freqs / config.rope_scale_factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / config.rope_scale_factor, blended)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


def rope_table(config: LlamaConfig, num_positions: int) -> torch.Tensor:
    """cos and sin of every position and pair: [num_positions, head_dim // 2, 2], float32."""
    angles = torch.outer(torch.arange(num_positions, dtype=torch.float32), rope_frequencies(config))
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of x [B, H, S, D] by rope [B, 1, S, D/2, 2], float32.

    The math runs in float32 whatever x's dtype, as the reference does.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = rope.unbind(-1)
    even, odd = pairs.unbind(-1)
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
    return rotated.flatten(-2).type_as(x)


# Keys per block of PyTorch's CPU flash attention (its kvSplitSize for caches of 512 slots or more).
_ATTENTION_BLOCK = 512


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.scale


class KVCache(nn.Module):
    """Keys and values of every position seen so far, one preallocated slot per position.

    Row r of the cache belongs to one sequence; a step works on a contiguous range of rows
    (`rows`, a slice) so that a batching engine can prefill one row while others decode.
    """

    def __init__(self, batch_size: int, num_kv_heads: int, num_positions: int, head_dim: int, *, dtype, device):
        super().__init__()
        shape = (batch_size, num_kv_heads, num_positions, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("rows", torch.arange(batch_size, device=device).unsqueeze(1), persistent=False)

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: slice
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H, S, D] at slots input_pos [B, S] of cache rows `rows`; return those rows."""
        keys, values = self.k[rows], self.v[rows]
        index = self.rows[: k.shape[0]]
        keys[index, :, input_pos] = k.transpose(1, 2)
        values[index, :, input_pos] = v.transpose(1, 2)
        return keys, values

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()

    def prefix(self, row: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of row `row`'s keys and values at slots 0 .. length-1: [H, length, D] each."""
        return self.k[row, :, :length], self.v[row, :, :length]

    def load_prefix(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write keys and values [H, L, D] into slots 0 .. L-1 of row `row`."""
        self.k[row, :, : keys.shape[1]] = keys
        self.v[row, :, : values.shape[1]] = values

    def copy_row(self, source: int, target: int, length: int) -> None:
        """Copy slots 0 .. length-1 of row `source` into row `target`."""
        self.load_prefix(target, *self.prefix(source, length))


class Linear(nn.Linear):
    """`nn.Linear` without bias whose one-row kernel is chosen per weight shape (`csm.kernels`).

    Until `csm.inference.prepare` chooses, one bf16/fp16 row on the CPU goes through `torch.mv`
    (the rule of csm 0.2), so the published model used for training and saving is unchanged.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.kernel = kernels.MV
        # With the packed kernel, the key under which a compiled graph finds this module's
        # weight (an opaque oneDNN tensor, which the compiler cannot trace through).
        self.packed_key: int | None = None

    def use_kernel(self, kernel: str) -> None:
        """Multiply with `kernel` from now on; `onednn-packed` reorders the weight in place
        (the plain layout is then gone: the module is for inference only)."""
        if kernel == kernels.PACKED and self.packed_key is None:
            self.weight = nn.Parameter(kernels.pack(self.weight), requires_grad=False)
            self.packed_key = _register_packed(self)
        elif kernel != kernels.PACKED and self.packed_key is not None:
            raise ValueError("a packed weight cannot go back to a plain kernel")
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_key is not None:
            if torch.compiler.is_compiling():
                return packed_linear(x, self.packed_key, self.out_features)
            return kernels.packed_product(x, self.weight)
        return linear(x, self.weight, self.kernel)


def linear(x: torch.Tensor, weight: torch.Tensor, kernel: str = kernels.MV) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T; one bf16/fp16 row on the CPU goes through `kernel`
    (`mv` or `linear`, see `csm.kernels`), chosen per call without touching the process-wide
    oneDNN switch that the threads running Mimi and the watermark read."""
    if kernel == kernels.MV and is_matrix_vector(x):
        # The custom operator only for the compiler: called eagerly it costs more dispatch.
        product = matrix_vector if torch.compiler.is_compiling() else torch.mv
        return product(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


@torch.library.custom_op("csm::matrix_vector", mutates_args=())
def matrix_vector(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`torch.mv` as an operator of its own, which `torch.compile` calls as it is instead of
    lowering it to a general matrix product (oneDNN's, the slow one for one row)."""
    return torch.mv(weight, x)


@matrix_vector.register_fake
def _(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return weight.new_empty(weight.shape[0])


# Packed linears by key, held weakly: a model that is dropped frees its weights.
_PACKED: weakref.WeakValueDictionary[int, Linear] = weakref.WeakValueDictionary()
_PACKED_KEYS = itertools.count()


def _register_packed(module: Linear) -> int:
    key = next(_PACKED_KEYS)
    _PACKED[key] = module
    return key


@torch.library.custom_op("csm::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    """A packed `Linear`'s product for a compiled graph: the graph holds the module's key, a
    constant, and the opaque weight stays outside it."""
    return kernels.packed_product(x, _PACKED[key].weight)


@packed_linear.register_fake
def _(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def is_matrix_vector(x: torch.Tensor) -> bool:
    """Whether `linear` multiplies x with `torch.mv`, whose output rows are each one dot
    product, independent of the other rows of the weight."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and x.numel() == x.shape[-1]


class _Attention(nn.Module, abc.ABC):
    """Grouped-query attention over a static KV cache; the subclass says how x becomes q, k and v."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.cache: KVCache | None = None

    @abc.abstractmethod
    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of x [B, S, dim]."""

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor, input_pos: torch.Tensor, rows: slice
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        k = apply_rope(k, rope)
        # Without a cache (training) the sequence attends to itself.
        keys, values = (k, v) if self.cache is None else self.cache.update(input_pos, k, v, rows)
        keys, values = keys[:, :, : mask.shape[-1]], values[:, :, : mask.shape[-1]]  # the slots the mask covers
        # Query head h reads kv head h // groups: fold each kv head's group of query heads into
        # the sequence axis instead of repeating the cache for every query head (the mask is
        # repeated likewise, once for all layers).
        groups = self.num_heads // self.num_kv_heads
        q = apply_rope(q, rope).reshape(batch, self.num_kv_heads, groups * seq, self.head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = out.reshape(batch, self.num_heads, seq, self.head_dim).transpose(1, 2).reshape(batch, seq, -1)
        return self.output_proj(out)


class Attention(_Attention):
    """The published layout: separate q, k and v projections (what checkpoints and LoRA name)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.q_proj = Linear(config.dim, config.num_heads * config.head_dim)
        self.k_proj = Linear(config.dim, config.num_kv_heads * config.head_dim)
        self.v_proj = Linear(config.dim, config.num_kv_heads * config.head_dim)
        self.output_proj = Linear(config.num_heads * config.head_dim, config.dim)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class FusedAttention(_Attention):
    """The inference form (`csm.inference`): q, k and v from one module that returns all three."""

    def __init__(self, config: LlamaConfig, qkv_proj: nn.Module, output_proj: nn.Module) -> None:
        super().__init__(config)
        self.qkv_proj = qkv_proj
        self.output_proj = output_proj

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.qkv_proj(x)


class _MLP(nn.Module, abc.ABC):
    """SwiGLU: w2(silu(gate) * up); the subclass says how x becomes gate and up."""

    @abc.abstractmethod
    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate and up projections of x."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.w2(F.silu(gate) * up)


class MLP(_MLP):
    """The published layout: separate gate (w1) and up (w3) projections."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.w1 = Linear(config.dim, config.ffn_dim)
        self.w2 = Linear(config.ffn_dim, config.dim)
        self.w3 = Linear(config.dim, config.ffn_dim)

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w1(x), self.w3(x)


class FusedMLP(_MLP):
    """The inference form (`csm.inference`): gate and up from one module that returns both."""

    def __init__(self, w13: nn.Module, w2: nn.Module) -> None:
        super().__init__()
        self.w13 = w13
        self.w2 = w2

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w13(x)


class Layer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.sa_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn: _Attention = Attention(config)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp: _MLP = MLP(config)

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor, input_pos: torch.Tensor, rows: slice
    ) -> torch.Tensor:
        h = x + self.attn(self.sa_norm(x), rope, mask, input_pos, rows)
        return h + self.mlp(self.mlp_norm(h))


class Llama(nn.Module):
    """A stack of decoder layers and a final norm: embeddings in, normed hidden states out."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)

    def setup_caches(self, batch_size: int, num_positions: int) -> None:
        """Allocate the KV caches and the RoPE table for positions 0 .. num_positions - 1."""
        weight = self.norm.scale
        for layer in self.layers:
            layer.attn.cache = KVCache(
                batch_size,
                self.config.num_kv_heads,
                num_positions,
                self.config.head_dim,
                dtype=weight.dtype,
                device=weight.device,
            )
        # The table is rounded to the weights' dtype, like the reference's (a bf16 model gets a
        # bf16 table); the rotation itself runs in float32.
        table = rope_table(self.config, num_positions).to(device=weight.device, dtype=weight.dtype)
        self.register_buffer("rope", table, persistent=False)
        self.register_buffer("slots", torch.arange(num_positions, device=weight.device), persistent=False)

    def reset_caches(self) -> None:
        for layer in self.layers:
            layer.attn.cache.reset()

    def cache_prefix(self, row: int, length: int) -> torch.Tensor:
        """A copy of row `row`'s keys and values at slots 0 .. length-1: [layers, 2, H, length, D]."""
        return torch.stack([torch.stack(layer.attn.cache.prefix(row, length)) for layer in self.layers])

    def load_cache_prefix(self, row: int, prefix: torch.Tensor) -> None:
        """Write a `cache_prefix` into row `row`, at the slots it was taken from."""
        for layer, (keys, values) in zip(self.layers, prefix, strict=True):
            layer.attn.cache.load_prefix(row, keys, values)

    def copy_cache_row(self, source: int, target: int, length: int) -> None:
        """Copy slots 0 .. length-1 of cache row `source` into row `target`."""
        for layer in self.layers:
            layer.attn.cache.copy_row(source, target, length)

    @property
    def has_caches(self) -> bool:
        return self.layers[0].attn.cache is not None

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """x [B, S, dim] at positions input_pos [B, S] (each row its own) -> [B, S, dim].

        With caches, each position is written to its slot in cache row `rows` (default: rows
        0 .. B-1) and attends to slots 0 .. its position of its own row, so rows may be at
        different positions. Without caches (training), each position attends to the
        positions of its row that are not after it.
        """
        if self.has_caches:
            rows = slice(0, x.shape[0]) if rows is None else rows
            slots = self.slots
            if x.device.type == "cpu" and not torch.compiler.is_compiling():
                # No position attends past the furthest one: attention skips the cache's whole
                # blocks of slots beyond it. Whole blocks of the CPU flash-attention kernel's own
                # size, so that its reduction runs in the same blocks and rounds as over the whole
                # cache (a cut inside a block changes bf16 results). Reading the position back
                # costs nothing on a CPU; compiled graphs and GPUs keep their static shapes.
                blocks = -(-(int(input_pos.max()) + 1) // _ATTENTION_BLOCK)
                slots = slots[: blocks * _ATTENTION_BLOCK]
            mask = (slots <= input_pos.unsqueeze(-1)).unsqueeze(1)
            rope = self.rope[input_pos]
        else:
            mask = (input_pos.unsqueeze(-2) <= input_pos.unsqueeze(-1)).unsqueeze(1)
            rope = rope_table(self.config, int(input_pos.max()) + 1).to(x.device)[input_pos]
        # Computed once here rather than in every layer: the rotation's float32 table and the
        # mask of the query heads folded into the sequence axis (see Attention).
        rope = rope.float().unsqueeze(1)
        mask = mask.repeat(1, 1, self.config.num_heads // self.config.num_kv_heads, 1)
        for layer in self.layers:
            x = layer(x, rope, mask, input_pos, rows)
        return self.norm(x)
