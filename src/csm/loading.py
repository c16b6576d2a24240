"""Load CSM: the plain published model, or its inference form ready for generation.

- `load_csm`: the published layout, as checkpoints hold it: what fine-tuning trains, what
  merging and `csm quantize` save.
- `load_for_generation`: the inference form (`csm.inference`): fused, optionally quantized
  products with kernels chosen per weight shape, optionally a compiled frame step
  (`csm.compiled`); what `load_csm_1b`, the engine and `csm bench` run.

Both read any published layout (`csm.checkpoints`) and merge a PEFT LoRA adapter
(`csm.adapters`) into the weights as they are read. The networks know nothing of this module.
"""

from __future__ import annotations

import torch

from csm import hub
from csm.checkpoints import build_model, open_checkpoint
from csm.compiled import CompiledCSM
from csm.devices import capabilities, check_dtype
from csm.errors import CheckpointError
from csm.heap import return_freed_memory
from csm.inference import check_quantize, choose_kernels, prepare
from csm.model import CSM
from csm.quantize import MODES, stored_format
from csm.quantized_checkpoint import build_quantized_model


def load_csm(
    source: hub.Source = "sesame/csm-1b",
    *,
    revision: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    adapter: hub.Source | None = None,
) -> CSM:
    """CSM from a hub repo id, a local folder or a weights file, in `dtype` (default float32) on `device`.

    The model has the published layout (what fine-tuning trains and what checkpoints hold);
    `load_for_generation` also prepares it for fast generation. `adapter` (a PEFT LoRA adapter:
    hub repo, folder or file) is merged into the weights, in float32, as they are read: the
    model that comes out is a plain CSM.
    """
    checkpoint = open_checkpoint(source, revision=revision, adapter=adapter)
    if checkpoint.quantization is not None:
        raise CheckpointError(
            f"{checkpoint.path} is quantized ({checkpoint.quantization}) and has no plain weights, which "
            "fine-tuning (quantized training is not supported), merging and saving need: use the unquantized "
            "model; to generate from this folder, load it with csm.loading.load_for_generation"
        )
    return build_model(
        checkpoint.config, checkpoint.stored, device=torch.device(device or "cpu"), dtype=dtype or torch.float32
    )


def load_for_generation(
    source: hub.Source = "sesame/csm-1b",
    *,
    revision: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    quantize: str | None = None,
    compile: bool = False,
    adapter: hub.Source | None = None,
) -> CSM:
    """Load a checkpoint (hub repo id, local folder or file) ready for generation.

    Any published layout (see `csm.checkpoints`) or a folder written by `csm quantize`.
    `dtype` defaults to float32, or bfloat16 with `quantize`. The model is prepared for
    speed (`csm.inference.prepare`): fused products, tokens unchanged; `quantize="int8"` or
    `"int4"` quantizes its linears (bfloat16 activations), `"int8-dynamic"` its activations
    too (`csm.quantize.MODES`). `compile=True` compiles the frame step (a
    `csm.compiled.CompiledCSM`). `adapter` is a PEFT LoRA adapter (hub repo id, folder or
    file), merged into the plain weights before they are prepared. For the plain published
    layout, for training or saving, use `load_csm`.
    """
    check_quantize(quantize)
    if (quantize is not None) and dtype not in (None, torch.bfloat16):
        raise ValueError(f"quantize={quantize!r} runs in bfloat16, not {str(dtype).removeprefix('torch.')}")
    device = torch.device(device or "cpu")
    if device.type in ("cuda", "mps"):
        check_dtype(capabilities(device), dtype or (torch.bfloat16 if quantize else torch.float32))
    network = CompiledCSM if compile else CSM
    checkpoint = open_checkpoint(source, revision=revision, adapter=adapter)
    if checkpoint.quantization is not None:
        # An int8 folder runs as "int8" or "int8-dynamic": both modes store the same weights.
        runs = quantize is None or stored_format(quantize) == checkpoint.quantization
        if not runs or dtype not in (None, torch.bfloat16):
            modes = " or ".join(repr(mode) for mode in MODES if stored_format(mode) == checkpoint.quantization)
            raise ValueError(
                f"{checkpoint.path} is quantized to {checkpoint.quantization} (bfloat16 activations): "
                f"load it with quantize=None or {modes} and the default dtype"
            )
        model = build_quantized_model(checkpoint, device=device, mode=quantize, network=network)
        choose_kernels(model)  # its heads, read after the quantized linears were built
    else:
        dtype = dtype or (torch.bfloat16 if quantize else torch.float32)
        # The published layout, adapter merged: the swap to fast modules comes after.
        model = build_model(checkpoint.config, checkpoint.stored, device=device, dtype=dtype, network=network)
        model = prepare(model, quantize)
    return_freed_memory()
    return model
