"""Which device and number format csm runs on when the user does not say.

The choice is made by pure functions of a device's `Capabilities` (what csm needs to know about
it), which `capabilities` reads from torch for the device asked for: the logic is tested on any
machine, the reading only where the device exists.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Apple's MPS has bfloat16 from macOS 14 (Sonoma) on.
MPS_BF16_MACOS = (14, 0)


def default_device() -> torch.device:
    """CUDA if present, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class Capabilities:
    """What the dtype choice needs to know about one device.

    `native_bf16`: bfloat16 arithmetic in hardware. On CUDA that is compute capability 8.0
    (Ampere) or newer: older GPUs (T4, V100) emulate it, slowly, and
    `torch.cuda.is_bf16_supported()` counts that emulation unless asked not to. On MPS it needs
    macOS 14. `name` is for messages.
    """

    kind: str
    native_bf16: bool
    name: str = ""


def capabilities(device: torch.device | str) -> Capabilities:
    """The capabilities of `device` itself (cuda:1 is asked about cuda:1, not the current GPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.cuda.device(index):
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        return Capabilities("cuda", native, torch.cuda.get_device_name(index))
    if device.type == "mps":
        return Capabilities("mps", torch.backends.mps.is_macos_or_newer(*MPS_BF16_MACOS), "Apple MPS")
    return Capabilities(device.type, True, device.type)


def dtype_for(capabilities: Capabilities) -> torch.dtype:
    """The CSM network's number format on a device with `capabilities`.

    bfloat16 wherever the hardware has it: one generated frame reads ~4.5 G weights, so the
    step is bound by memory traffic and half-width weights nearly halve it (the reference runs
    CSM in bfloat16 too). Elsewhere float32, not float16: the network was trained and is
    published in bfloat16, whose range float16 lacks (float16 overflows past 65504, bfloat16 past
    3e38), and no one has checked CSM's activations against that limit; a user who wants to try
    asks for float16 (`dtype=torch.float16`, `--dtype float16`).
    """
    return torch.bfloat16 if capabilities.native_bf16 else torch.float32


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The CSM network's number format on `device` (Mimi and the watermark always run in float32)."""
    return dtype_for(capabilities(device))


def check_dtype(capabilities: Capabilities, dtype: torch.dtype) -> None:
    """Refuse bfloat16 where the device cannot run it at all (MPS before macOS 14); warn where it
    is emulated (CUDA before Ampere), which works but is slower than float32."""
    if dtype != torch.bfloat16 or capabilities.native_bf16:
        return
    if capabilities.kind == "mps":
        raise ValueError(
            "bfloat16 on MPS needs macOS 14 or newer: use dtype float32 (--dtype float32), or float16"
        )
    if capabilities.kind == "cuda":
        warnings.warn(
            f"{capabilities.name} has no native bfloat16 (compute capability below 8.0): it is emulated "
            "and slow; float32 (the default on this GPU) or float16 run faster",
            stacklevel=3,
        )


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
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} requested but MPS is not available here")
    return device


def embedding_bag_runs_on(device: torch.device | str) -> bool:
    """Whether `F.embedding_bag` (with per-sample weights, as CSM's embedding uses it) has a
    kernel on `device`: MPS got one only in recent torch. Tried once per device."""
    device = torch.device(device)
    if device.type == "cpu" or device.type == "cuda":
        return True
    key = str(device)
    if key not in _embedding_bag:
        try:
            torch.nn.functional.embedding_bag(
                torch.zeros(1, 2, dtype=torch.long, device=device),
                torch.zeros(4, 8, device=device),
                mode="sum",
                per_sample_weights=torch.ones(1, 2, device=device),
            )
            _embedding_bag[key] = True
        except (NotImplementedError, RuntimeError):
            warnings.warn(
                f"torch {torch.__version__} has no {device.type} kernel for embedding_bag: csm sums "
                "its audio embeddings with embedding and sum instead (slower; newer torch has the kernel)",
                stacklevel=2,
            )
            _embedding_bag[key] = False
    return _embedding_bag[key]


_embedding_bag: dict[str, bool] = {}
