"""`torch.compile` of the frame step: the backbone's step over one new position and one depth-decoder step.

Sampling stays outside the compiled graphs, so the random draws are the eager ones. On CPU,
inductor fuses the small operations around the matrix products (norms, RoPE, the cache
writes) and removes most of their dispatch cost; on CUDA the graphs are also captured as
CUDA graphs ("reduce-overhead"), the depth decoder's steps included. The first frame pays
for the compilation (tens of seconds on a CPU); `model.compile_seconds` reports it.

Guarantee: the same computation up to floating-point rounding (inductor may keep bf16
intermediates in float32 and reorder reductions), so logits agree within rounding and
tokens agree unless two candidates are within rounding of each other.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from csm.model import CSM


def compile_frame_step(model: CSM) -> CSM:
    """Compile `model`'s one-position backbone step and its depth-decoder step in place; returns it.

    Each is compiled at its first call, for static shapes: the batch size and the cache rows
    are part of the graph, so a new batch size or row range compiles again (a batching
    engine that steps many different ranges is better served eagerly). A prompt of several
    positions (prefill, a large product that compilation does not speed up) runs eagerly, so
    prompts of new lengths never wait for the compiler.
    """
    cuda = model.codebook_offsets.device.type == "cuda"
    options = {"mode": "reduce-overhead"} if cuda else {}
    model.compile_seconds = {}
    eager_backbone = model.backbone_hidden
    backbone_step = _timed(model, "backbone step", torch.compile(eager_backbone, dynamic=False, **options))
    backbone_step = outliving_replays(backbone_step, cuda_graphs=cuda)

    def backbone_hidden(tokens, tokens_mask, input_pos, rows=None):
        # Any one-position call, a decoding step or a prompt chunk of one position, runs the
        # compiled step: both have the same shapes, and its output outlives the next replay.
        run = backbone_step if tokens.shape[1] == 1 else eager_backbone
        return run(tokens, tokens_mask, input_pos, rows)

    model.backbone_hidden = backbone_hidden
    depth_step = _timed(model, "depth step", torch.compile(model.depth_step, dynamic=False, **options))
    model.depth_step = outliving_replays(depth_step, cuda_graphs=cuda)
    return model


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


def _timed(model: CSM, name: str, compiled: Callable) -> Callable:
    """`compiled`, recording how long its first call (which compiles it) takes in model.compile_seconds."""

    def call(*args, **kwargs):
        if name in model.compile_seconds:
            return compiled(*args, **kwargs)
        start = time.perf_counter()
        result = compiled(*args, **kwargs)
        model.compile_seconds[name] = time.perf_counter() - start
        return result

    return call
