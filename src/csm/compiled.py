"""`torch.compile` of the frame step: the backbone's step over one new position and one depth-decoder step.

Sampling stays outside the compiled graphs, so the random draws are the eager ones. On CPU,
inductor fuses the small operations around the matrix products (norms, RoPE, the cache
writes) and removes most of their dispatch cost; on CUDA the graphs are also captured as
CUDA graphs ("reduce-overhead"), the depth decoder's steps included. The first frame pays
for the compilation (tens of seconds on a CPU); `model.compile_seconds` reports it.
`CompiledCSM` is a `CSM` whose two steps are compiled: the network is unchanged, and the
generator and the engine call it through the same methods.

Guarantee: the same computation up to floating-point rounding (inductor may keep bf16
intermediates in float32 and reorder reductions), so logits agree within rounding and
tokens agree unless two candidates are within rounding of each other.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from csm.model import CSM, CSMConfig


class CompiledCSM(CSM):
    """CSM whose one-position backbone step and depth-decoder step run through `torch.compile`.

    Built in place of `CSM` by `csm.loading.load_for_generation(..., compile=True)`. The steps
    are compiled for static shapes, one graph per batch size, so that a batching engine does
    not recompile at every new count of rows (nor, past dynamo's limit, silently fall back to
    eager): a step over rows 0 .. n-1 runs padded to the next of a few sizes (`row_buckets`:
    1, 2, 4, ... up to the cache's rows), with the padding rows' results dropped. A step
    over rows that start elsewhere (a one-position prompt chunk in a row of its own) and a
    prompt of several positions (prefill, a large product that compilation does not speed up)
    run eagerly, so they never wait for the compiler. `compile_seconds` records how long each
    graph's first call took; `warm_up` compiles every graph up front.
    """

    def __init__(self, config: CSMConfig) -> None:
        super().__init__(config)
        self.compile_seconds: dict[str, float] = {}
        self._compiled: dict[str, Callable[..., torch.Tensor]] = {}

    def setup_caches(self, batch_size: int) -> None:
        super().setup_caches(batch_size)
        # Each bucket is a graph of the backbone step and two of the depth step (its first
        # position of a frame takes two inputs): dynamo must keep them all.
        graphs = 2 * len(row_buckets(batch_size))
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs)

    def backbone_hidden(
        self, tokens: torch.Tensor, tokens_mask: torch.Tensor, input_pos: torch.Tensor, rows: slice | None = None
    ) -> torch.Tensor:
        rows = self._check_caches(tokens.shape[0], rows)
        if tokens.shape[1] != 1 or rows.start != 0:
            return super().backbone_hidden(tokens, tokens_mask, input_pos, rows)
        count = tokens.shape[0]
        bucket = self._bucket(count)
        # A padding row writes its keys and values at the cache's last position, which every
        # sequence writes before it reads it: whatever that row holds is left as it was.
        last = self.max_seq_len - 1
        padded = (
            _pad_rows(tokens, bucket, 0),
            _pad_rows(tokens_mask, bucket, False),
            _pad_rows(input_pos, bucket, last),
        )
        step = self._step(f"backbone step x{bucket}", super().backbone_hidden)
        return step(*padded, slice(0, bucket))[:count]

    def depth_step(
        self, inputs: torch.Tensor, positions: torch.Tensor, rows: slice, head: torch.Tensor
    ) -> torch.Tensor:
        if rows.start != 0:
            return super().depth_step(inputs, positions, rows, head)
        count = inputs.shape[0]
        bucket = self._bucket(count)
        # The depth decoder's cache holds one frame, rewritten by each: a padding row's is free.
        padded_positions = positions[:1].expand(bucket, -1)
        step = self._step(f"depth step x{bucket} ({inputs.shape[1]} in)", super().depth_step)
        return step(_pad_rows(inputs, bucket, 0), padded_positions, slice(0, bucket), head)[:count]

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Compile every graph the set-up caches' rows can need (each bucket's backbone step and
        depth steps); the seconds it took. Without it each graph compiles at its first use,
        holding up every row stepping with it."""
        started = time.perf_counter()
        dim = self.config.backbone.dim
        device, dtype = self.codebook_offsets.device, self.audio_head.dtype
        for bucket in row_buckets(self.cache_rows):
            tokens = torch.zeros(bucket, 1, self.config.audio_num_codebooks + 1, dtype=torch.long, device=device)
            last = torch.full((bucket, 1), self.max_seq_len - 1, device=device)
            self.backbone_hidden(tokens, torch.zeros_like(tokens, dtype=torch.bool), last, slice(0, bucket))
            for inputs in (2, 1):
                hidden = torch.zeros(bucket, inputs, dim, dtype=dtype, device=device)
                positions = self.depth_positions[:bucket, :inputs]
                self.depth_step(hidden, positions, slice(0, bucket), self.audio_head[0])
        return time.perf_counter() - started

    def _bucket(self, count: int) -> int:
        return next(bucket for bucket in row_buckets(self.cache_rows) if bucket >= count)

    def _step(self, name: str, eager: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """The compiled form of `eager` for one shape, made on first use (when the weights and
        device are final)."""
        if name not in self._compiled:
            cuda = self.codebook_offsets.device.type == "cuda"
            options = {"mode": "reduce-overhead"} if cuda else {}
            step = _timed(self.compile_seconds, name, torch.compile(eager, dynamic=False, **options))
            self._compiled[name] = outliving_replays(step, cuda_graphs=cuda)
        return self._compiled[name]


def row_buckets(rows: int) -> list[int]:
    """The batch sizes compiled for caches of `rows` rows: the powers of two below it, and itself."""
    buckets = [1 << power for power in range(rows.bit_length()) if 1 << power < rows]
    return [*buckets, rows]


def _pad_rows(tensor: torch.Tensor, rows: int, value: float | bool) -> torch.Tensor:
    """`tensor` with rows of `value` added below its own, up to `rows`."""
    if tensor.shape[0] == rows:
        return tensor
    padding = tensor.new_full((rows - tensor.shape[0], *tensor.shape[1:]), value)
    return torch.cat([tensor, padding])


def outliving_replays(step: Callable[..., torch.Tensor], *, cuda_graphs: bool) -> Callable[..., torch.Tensor]:
    """`step`, whose output stays valid after later calls.

    A CUDA graph writes its output into memory of its own, which the next replay overwrites, and
    the callers keep outputs across calls (the engine holds a row's backbone state while other
    rows step; a frame's depth steps follow one backbone state). So with CUDA graphs each call
    begins a new step for the graph trees and returns a copy (a few KB); elsewhere the output is
    the caller's already.
    """
    if not cuda_graphs:
        return step

    def call(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return step(*args, **kwargs).clone()

    return call


def _timed(seconds: dict[str, float], name: str, compiled: Callable) -> Callable:
    """`compiled`, recording how long its first call (which compiles it) takes in seconds[name]."""

    def call(*args, **kwargs):
        if name in seconds:
            return compiled(*args, **kwargs)
        start = time.perf_counter()
        result = compiled(*args, **kwargs)
        seconds[name] = time.perf_counter() - start
        return result

    return call
