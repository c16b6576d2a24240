"""Which device and number format csm runs on when the user does not say."""

from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> torch.device:
    """CUDA if present, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The CSM network's number format on `device` (Mimi and the watermark always run in float32).

    bfloat16 wherever it is supported: one generated frame reads ~4.5 G weights, so the
    step is bound by memory traffic and half-width weights nearly halve it (the reference
    runs CSM in bfloat16 too; on this project's 2-core CPU a 2048x8192 batch-1 linear
    takes 2.8 ms in bfloat16 against 4.6 ms in float32). GPUs without bfloat16 fall back to float32, not float16,
    whose narrow range the network was never trained for.
    """
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float32
    return torch.bfloat16


def parse_dtype(name: str) -> torch.dtype:
    """A dtype from its name as users type it ("bfloat16", "bf16", "float32", "fp32", ...)."""
    aliases = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "half": "float16", "float": "float32"}
    key = aliases.get(name.lower(), name.lower())
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use one of {', '.join(_DTYPES)}")
    return _DTYPES[key]


def parse_device(name: str) -> torch.device:
    """A device from its name, checked to exist on this machine."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} requested but MPS is not available here")
    return device
