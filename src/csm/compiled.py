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

    Built in place of `CSM` by `csm.loading.load_for_generation(..., compile=True)`. Each step
    is compiled at its first call, for static shapes: the batch size and the cache rows are part
    of the graph, so a new batch size or row range compiles again (a batching engine that steps
    many different ranges is better served eagerly). A prompt of several positions (prefill, a
    large product that compilation does not speed up) runs eagerly, so prompts of new lengths
    never wait for the compiler. `compile_seconds` records how long each first call took.
    """

    def __init__(self, config: CSMConfig) -> None:
        super().__init__(config)
        self.compile_seconds: dict[str, float] = {}
        self._compiled: dict[str, Callable[..., torch.Tensor]] = {}

    def backbone_hidden(
        self, tokens: torch.Tensor, tokens_mask: torch.Tensor, input_pos: torch.Tensor, rows: slice | None = None
    ) -> torch.Tensor:
        # Any one-position call, a decoding step or a prompt chunk of one position, runs the
        # compiled step: both have the same shapes, and its output outlives the next replay.
        if tokens.shape[1] != 1:
            return super().backbone_hidden(tokens, tokens_mask, input_pos, rows)
        return self._step("backbone step", super().backbone_hidden)(tokens, tokens_mask, input_pos, rows)

    def depth_step(
        self, inputs: torch.Tensor, positions: torch.Tensor, rows: slice, head: torch.Tensor
    ) -> torch.Tensor:
        return self._step("depth step", super().depth_step)(inputs, positions, rows, head)

    def _step(self, name: str, eager: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """The compiled form of `eager`, made on first use (when the weights and device are final)."""
        if name not in self._compiled:
            cuda = self.codebook_offsets.device.type == "cuda"
            options = {"mode": "reduce-overhead"} if cuda else {}
            step = _timed(self.compile_seconds, name, torch.compile(eager, dynamic=False, **options))
            self._compiled[name] = outliving_replays(step, cuda_graphs=cuda)
        return self._compiled[name]


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
