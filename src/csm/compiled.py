"""`torch.compile` of the frame step: the backbone over new positions and one depth-decoder step.

Sampling stays outside the compiled graphs, so the random draws are the eager ones. On CPU,
inductor fuses the small operations around the matrix products (norms, RoPE, the cache
writes) and removes most of their dispatch cost; on CUDA the graphs are also captured as
CUDA graphs ("reduce-overhead"), the depth decoder's steps included. The first frame pays
for the compilation (tens of seconds on a CPU); `CompiledTimes` reports it.

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
    """Compile `model`'s backbone and depth-decoder step in place (on the first call); returns it."""
    cuda = next(model.parameters()).device.type == "cuda"
    options = {"mode": "reduce-overhead"} if cuda else {}
    model.compile_seconds = {}
    model.backbone_hidden = _timed(model, "backbone", torch.compile(model.backbone_hidden, dynamic=False, **options))
    model.depth_step = _timed(model, "depth step", torch.compile(model.depth_step, dynamic=False, **options))
    return model


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
