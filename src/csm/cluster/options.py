"""The cluster's arguments: the strings `serve run csm.cluster:app key=value ...` or a Serve
config file's `args` pass, checked and typed before anything loads.

Every key is one of `ARGUMENTS`; an unknown key, a malformed value or a contradiction (two ways of
counting replicas, a CUDA device on replicas without a GPU) is a `ValueError` that names it.
Values may also be given typed (from YAML: numbers, booleans).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from csm.devices import parse_dtype

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_REPLICAS = 4
# Loading a replica takes tens of seconds (weights, then the first frames): scale up when the
# load has lasted, and down only after a long quiet spell.
DEFAULT_UPSCALE_DELAY_S = 30.0
DEFAULT_DOWNSCALE_DELAY_S = 600.0

ARGUMENTS = (
    "model", "mimi", "tokenizer", "watermarker", "device", "dtype", "quantize", "compile", "adapter",
    "watermark", "watermark_key", "api_key", "voices_dir", "num_replicas", "min_replicas", "max_replicas",
    "upscale_delay_s", "downscale_delay_s", "max_batch", "max_queue", "replica_cpus", "replica_gpus",
)  # fmt: skip
QUANTIZE_MODES = ("int8", "int8-dynamic", "int4")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(frozen=True)
class ClusterOptions:
    """What one csm application on Ray Serve runs: the model each engine replica loads, the
    voices and key the ingress uses, and how many replicas of what size.

    `num_replicas` fixes the count; otherwise Serve autoscales between `min_replicas` and
    `max_replicas` on the requests each replica holds, adding a replica once the load has
    stayed above its target for `upscale_delay_s` and removing one once it has stayed below
    for `downscale_delay_s` (see `csm.cluster.application`).
    """

    model: str = "sesame/csm-1b"
    mimi: str = "kyutai/moshiko-pytorch-bf16"
    tokenizer: str | None = None
    watermarker: str = "sony/silentcipher"
    device: str | None = None  # None: the best on each replica
    dtype: str | None = None  # None: the best for the replica's device
    quantize: str | None = None
    compile: bool = False
    adapter: str | None = None
    watermark: bool = True
    watermark_key: tuple[int, ...] | None = None
    api_key: str | None = None
    voices_dir: str = "~/.local/share/csm/voices"
    num_replicas: int | None = None
    min_replicas: int = 1
    max_replicas: int = DEFAULT_MAX_REPLICAS
    upscale_delay_s: float = DEFAULT_UPSCALE_DELAY_S
    downscale_delay_s: float = DEFAULT_DOWNSCALE_DELAY_S
    max_batch: int = DEFAULT_MAX_BATCH
    max_queue: int = DEFAULT_MAX_QUEUE
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0

    @property
    def watermarking(self) -> bool | list[int]:
        """`load_csm_1b`'s `watermark`: off, on, or on with the operator's key."""
        if not self.watermark:
            return False
        return list(self.watermark_key) if self.watermark_key else True

    @property
    def autoscaling(self) -> bool:
        return self.num_replicas is None


def parse_options(args: Mapping[str, object]) -> ClusterOptions:
    """Typed, checked options from the application's arguments (a `ValueError` naming the first bad one)."""
    unknown = sorted(set(args) - set(ARGUMENTS))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}: csm.cluster:app takes {', '.join(ARGUMENTS)}")
    values: dict[str, object] = {}
    for name in ("model", "mimi", "tokenizer", "watermarker", "adapter", "api_key", "voices_dir"):
        if name in args:
            values[name] = _text(name, args[name])
    for name in ("compile", "watermark"):
        if name in args:
            values[name] = _flag(name, args[name])
    for name, low in (
        ("num_replicas", 1),
        ("min_replicas", 0),
        ("max_replicas", 1),
        ("max_batch", 1),
        ("max_queue", 1),
    ):
        if name in args:
            values[name] = _integer(name, args[name], low)
    for name in ("replica_cpus", "replica_gpus", "upscale_delay_s", "downscale_delay_s"):
        if name in args:
            values[name] = _amount(name, args[name])
    if "device" in args:
        values["device"] = _device(_text("device", args["device"]))
    if "dtype" in args:
        name = _text("dtype", args["dtype"])
        parse_dtype(name)  # a ValueError naming the known ones
        values["dtype"] = name
    if "quantize" in args:
        mode = _text("quantize", args["quantize"])
        if mode not in QUANTIZE_MODES:
            raise ValueError(f"quantize: {mode!r} is not one of {', '.join(QUANTIZE_MODES)}")
        values["quantize"] = mode
    if "watermark_key" in args:
        values["watermark_key"] = _watermark_key(args["watermark_key"])
    options = ClusterOptions(**values)
    _check_together(options, set(args))
    return options


def _check_together(options: ClusterOptions, given: set[str]) -> None:
    if "num_replicas" in given and given & {"min_replicas", "max_replicas"}:
        raise ValueError("give num_replicas (a fixed count) or min_replicas/max_replicas (autoscaling), not both")
    delays = sorted(given & {"upscale_delay_s", "downscale_delay_s"})
    if "num_replicas" in given and delays:
        raise ValueError(
            f"{', '.join(delays)}: autoscaling delays, but num_replicas fixes the count (autoscale with min/max_replicas)"
        )
    if options.min_replicas > options.max_replicas:
        raise ValueError(f"min_replicas ({options.min_replicas}) is above max_replicas ({options.max_replicas})")
    if options.device and options.device.startswith("cuda") and options.replica_gpus == 0:
        raise ValueError(f"device {options.device} needs replica_gpus (the GPUs Ray gives each replica), e.g. 1")
    if options.replica_gpus > 0 and options.device in ("cpu", "mps"):
        raise ValueError(
            f"replica_gpus={options.replica_gpus:g} reserves GPUs that device {options.device} leaves idle"
        )
    if options.watermark_key and not options.watermark:
        raise ValueError("watermark_key is given but watermark is false")


def _text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: expected a non-empty string, got {value!r}")
    return value.strip()


def _flag(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name}: expected true or false, got {value!r}")


def _integer(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{name}: expected a whole number, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name}: expected a whole number, got {value!r}") from None
    if number < low:
        raise ValueError(f"{name}: must be at least {low}, got {number}")
    return number


def _amount(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"{name}: must be a finite number at least 0, got {value!r}")
    return number


def _device(name: str) -> str:
    try:
        kind = torch.device(name).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device: unknown device {name!r}: use cpu, cuda, cuda:N or mps")
    return name


def _watermark_key(value: object) -> tuple[int, ...]:
    parts = value.split(",") if isinstance(value, str) else value
    try:
        key = tuple(int(part) for part in parts)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        key = ()
    if len(key) != 5 or not all(0 <= byte <= 255 for byte in key):
        raise ValueError(f"watermark_key: expected 5 comma-separated bytes (0-255), got {value!r}")
    return key
