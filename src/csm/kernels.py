"""Which kernel multiplies one activation row by a bf16 (or fp16) weight on this CPU, by measurement.

A generated frame is ~620 one-row products over ~4.5 GB of weights, so the speed of the one-row
kernel is the speed of bf16 generation, and the fastest kernel differs between CPUs of one
family (on a Zen 4 `torch.mv` was twice `F.linear`; on a Zen 5 it was the slowest of three).
So csm does not guess: for each weight shape the hot path uses, it times the kernels it can
reach per call, once per machine, and keeps the fastest (ties within 5% going to the simplest)
in a cache file.

Candidates (each reachable per call, with no process-wide switch; every one accumulates in
float32 and rounds the output once, so they agree within bf16 rounding):

- `mv`: `torch.mv` over the weight as stored [N, K];
- `linear`: `F.linear` (a oneDNN matmul, the weight read as [K, N] transposed);
- `onednn-packed`: the weight reordered once into oneDNN's blocked layout
  (`mkldnn._reorder_linear_weight`), multiplied by `mkldnn._linear_pointwise`; the packed weight
  replaces the plain one, so it costs no memory.

PyTorch's portable mat-vec kernel (the fastest on some CPUs) is reachable only with oneDNN off
for the whole process (`torch.backends.mkldnn.enabled = False`): every aten route to a
bf16 product (`mv`, `addmv`, `mm`, `bmm`, `matmul`, `einsum`, transposed layouts) goes to
oneDNN when it is on. csm never flips that switch (other threads run Mimi and the watermark,
which it makes ~2x slower); a user who sets it off before loading gets it measured as `mv`.

Several rows (an engine's batch, a prompt) go through `F.linear`, or the packed kernel where
the weight was packed: both are oneDNN's multi-row matmul, which `mv` cannot run.

The cache, `$CSM_KERNEL_CACHE` or `$XDG_CACHE_HOME/csm/kernels.json` (`~/.cache/csm/...`), is
keyed by CPU (vendor, family, model), torch version, thread count, whether oneDNN is on, dtype
and shape; an entry that is malformed or names an unknown kernel is measured again, and a file
that cannot be read is replaced. `CSM_KERNELS=off` skips measuring and uses `mv` (the rule of
csm 0.2); `CSM_KERNELS=<kernel>` uses that kernel for every shape. `CSM_ONEDNN=off` turns
oneDNN off for the whole process at import (see `apply_onednn_setting`), the one way to the
portable kernel.
"""

from __future__ import annotations

import json
import math
import os
import platform
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

CACHE_ENV = "CSM_KERNEL_CACHE"
POLICY_ENV = "CSM_KERNELS"
ONEDNN_ENV = "CSM_ONEDNN"
MV, LINEAR, PACKED = "mv", "linear", "onednn-packed"
KERNELS = (MV, LINEAR, PACKED)
# Kernels that multiply the weight as stored, and so serve any caller that has only a tensor.
PLAIN_KERNELS = (MV, LINEAR)
CACHE_VERSION = 1
# Measured over copies of a weight that together exceed the L3 cache (at most 64): in a frame
# every weight comes from memory, so a kernel timed on a cached weight would win by a speed it
# never has there.
_CACHE_BYTES = 64 << 20
_MAX_COPIES = 64
_ROUNDS = 10
_ROUND_SECONDS = 0.01
# Kernels within 5% of the fastest count as tied (see `fastest`).
TIE = 0.05


@dataclass(frozen=True)
class Shape:
    """A weight of `out_features` x `in_features` in `dtype`, multiplied by one row."""

    out_features: int
    in_features: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features * (torch.finfo(self.dtype).bits // 8)

    def __str__(self) -> str:
        return f"{self.out_features}x{self.in_features} {str(self.dtype).removeprefix('torch.')}"


@dataclass(frozen=True)
class Choice:
    """The kernel for one shape, and each candidate's measured speed in GB/s of weight read
    (empty where nothing was measured: a forced or default kernel)."""

    kernel: str
    gbps: dict[str, float] = field(default_factory=dict)

    @property
    def plain(self) -> str:
        """The fastest kernel over the weight as stored, for callers that cannot pack it."""
        measured = {name: speed for name, speed in self.gbps.items() if name in PLAIN_KERNELS}
        if self.kernel in PLAIN_KERNELS or not measured:
            return self.kernel if self.kernel in PLAIN_KERNELS else MV
        return fastest(measured)


# ---- the kernels ----------------------------------------------------------------------------


def packed_available(dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack a `dtype` weight here (fp16 needs AVX512-FP16 or AVX-NE-CONVERT)."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    try:
        pack(torch.zeros(16, 16, dtype=dtype))
    except RuntimeError:
        return False
    return True


def pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [N, K] in oneDNN's blocked layout, for `packed_product` (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def packed_product(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [..., K] times a `pack`ed weight: [..., N], any number of rows."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def plain_product(kernel: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T with a plain kernel; `mv` takes one row only."""
    if kernel == MV:
        return torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


# ---- measuring --------------------------------------------------------------------------------


def measure(shape: Shape, candidates: tuple[str, ...] | None = None) -> dict[str, float]:
    """GB/s of weight read by each candidate on one row of `shape`, on this machine, now."""
    return measure_many([shape], candidates)[shape]


def measure_many(shapes: list[Shape], candidates: tuple[str, ...] | None = None) -> dict[Shape, dict[str, float]]:
    """GB/s of weight read by each candidate on one row of each shape (under a second a shape).

    Round after round, every shape's candidates run interleaved, each for ~10 ms of calls that
    go on through copies of the weight too large together for the caches. Each call is timed,
    and a candidate's speed is that of its 10th-percentile call. The machine is often shared,
    and on two cores a parallel kernel whose second thread is descheduled runs several times
    slower: another process only ever slows a call down, so the fast calls are the undisturbed
    ones, a low percentile rather than the minimum keeps one lucky call from deciding, and the
    rounds spread each shape's calls over the whole measurement, so that a burst of other work
    cannot spoil one shape's every call.
    """
    shapes = list(dict.fromkeys(shapes))
    benches = [_Bench(shape, candidates or available(shape.dtype)) for shape in shapes]
    for bench in benches:
        bench.warm_up()
    for round_ in range(_ROUNDS):
        for bench in benches:
            bench.round(round_)
    return {bench.shape: bench.speeds() for bench in benches}


class _Bench:
    """One shape's candidates, each over its own copies of a random weight."""

    def __init__(self, shape: Shape, candidates: tuple[str, ...]) -> None:
        self.shape = shape
        self.copies = max(1, min(_MAX_COPIES, math.ceil(_CACHE_BYTES / shape.nbytes)))
        size = self.copies * shape.out_features * shape.in_features
        # One buffer of random values, cut into contiguous copies (fast to fill, unlike randn).
        weights = torch.empty(size, dtype=shape.dtype).uniform_(-1, 1)
        weights = list(weights.view(self.copies, shape.out_features, shape.in_features).unbind())
        x = torch.empty(1, shape.in_features, dtype=shape.dtype).uniform_(-1, 1)
        self.calls: dict[str, list[Callable[[], object]]] = {}
        for name in candidates:
            if name == PACKED:
                self.calls[name] = [partial(packed_product, x, pack(weight)) for weight in weights]
            else:
                self.calls[name] = [partial(plain_product, name, x, weight) for weight in weights]
        self.next_copy = dict.fromkeys(self.calls, 0)
        self.counts = dict.fromkeys(self.calls, 2)
        self.times: dict[str, list[float]] = {name: [] for name in self.calls}

    def run(self, name: str, count: int) -> list[float]:
        """Seconds of each of `count` calls (fewer if they take over twice a round's time: a busy
        machine must not stretch the measurement), going on through the copies where the last
        run stopped."""
        seconds: list[float] = []
        while len(seconds) < count and sum(seconds) < 2 * _ROUND_SECONDS:
            started = time.perf_counter()
            self.calls[name][self.next_copy[name] % self.copies]()
            seconds.append(time.perf_counter() - started)
            self.next_copy[name] += 1
        return seconds

    def warm_up(self) -> None:
        """Page faults and oneDNN's kernel generation, untimed; also sizes the rounds."""
        for name in self.calls:
            fastest = min(self.run(name, max(2, min(self.copies, 4))))
            self.counts[name] = max(2, round(_ROUND_SECONDS / max(fastest, 1e-7)))

    def round(self, index: int) -> None:
        order = list(self.calls)
        for name in order[index % len(order) :] + order[: index % len(order)]:
            self.times[name] += self.run(name, self.counts[name])

    def speeds(self) -> dict[str, float]:
        return {name: self.shape.nbytes / _percentile(seconds, 0.1) / 1e9 for name, seconds in self.times.items()}


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def available(dtype: torch.dtype) -> tuple[str, ...]:
    return KERNELS if packed_available(dtype) else PLAIN_KERNELS


# ---- the cache --------------------------------------------------------------------------------


def cache_path() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "csm" / "kernels.json"


def machine() -> str:
    """What a measurement depends on besides the shape: the CPU, torch, threads, oneDNN."""
    onednn = "onednn on" if torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled else "onednn off"
    return f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {onednn}"


def cpu_name() -> str:
    """The CPU's vendor, family, model and name: one name ("AMD EPYC") covers several generations."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}".strip()
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    parts = [fields.get(name) for name in ("vendor_id", "cpu family", "model", "model name", "CPU part")]
    return " ".join(part for part in parts if part) or platform.machine()


def key(shape: Shape) -> str:
    return f"{machine()} | {str(shape.dtype).removeprefix('torch.')} | {shape.out_features}x{shape.in_features} | 1 row"


class KernelTable:
    """The kernel of each shape: from memory, else the cache file, else measured (then saved).

    `policy`: "measure" (default), "off" (always `mv`, nothing measured or saved), or a kernel
    name to use for every shape. Thread-safe: measuring happens under a lock, once per shape.
    """

    def __init__(
        self,
        path: Path | None = None,
        policy: str | None = None,
        measure: Callable[[list[Shape]], dict[Shape, dict[str, float]]] = measure_many,
    ) -> None:
        self.path = path or cache_path()
        self.policy = (policy or os.environ.get(POLICY_ENV) or "measure").lower()
        if self.policy not in ("measure", "off", *KERNELS):
            raise ValueError(f"{POLICY_ENV}={self.policy!r}: use measure, off or one of {', '.join(KERNELS)}")
        self._measure = measure
        self._choices: dict[Shape, Choice] = {}
        self._lock = threading.Lock()

    def choice(self, shape: Shape) -> Choice:
        return self.choices([shape])[shape]

    def choices(self, shapes: list[Shape]) -> dict[Shape, Choice]:
        """The choice of each shape; those neither in memory nor in the file are measured together."""
        with self._lock:
            missing = [shape for shape in dict.fromkeys(shapes) if shape not in self._choices]
            if missing:
                self._choices.update(self._choose(missing))
            return {shape: self._choices[shape] for shape in shapes}

    def _choose(self, shapes: list[Shape]) -> dict[Shape, Choice]:
        if self.policy == "off":
            return dict.fromkeys(shapes, Choice(MV))
        if self.policy != "measure":
            for shape in shapes:
                if self.policy == PACKED and not packed_available(shape.dtype):
                    raise ValueError(f"{POLICY_ENV}={PACKED}: oneDNN cannot pack {shape.dtype} weights on this CPU")
            return dict.fromkeys(shapes, Choice(self.policy))
        stored = self._read()
        chosen = {shape: _parse(stored.get(key(shape)), shape.dtype) for shape in shapes}
        missing = [shape for shape, choice in chosen.items() if choice is None]
        if missing:
            measured = self._measure(missing)
            for shape in missing:
                chosen[shape] = Choice(fastest(measured[shape]), measured[shape])
            rounded = {shape: {name: round(speed, 2) for name, speed in measured[shape].items()} for shape in missing}
            self._write({key(shape): {"kernel": chosen[shape].kernel, "gbps": rounded[shape]} for shape in missing})
        return chosen

    def _read(self) -> dict[str, object]:
        """The file's entries; {} when it is missing, unreadable, or not this format."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            return {}
        if not isinstance(data.get("entries"), dict):
            return {}
        return data["entries"]

    def _write(self, new: dict[str, dict]) -> None:
        """Add entries, keeping the others of the file; a write that fails costs only a later re-measure."""
        entries = {**self._read(), **new}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(f"{self.path.name}.{os.getpid()}.partial")
            partial.write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1, sort_keys=True))
            partial.replace(self.path)
        except OSError:
            pass


def fastest(speeds: dict[str, float]) -> str:
    """The first kernel, in the order of `KERNELS` (the simplest first: `mv` keeps csm 0.2's
    rule, `linear` the plain layout), within `TIE` of the fastest: closer than that is noise of
    a shared machine, and a choice that flips with the noise would change rounding from one
    measurement to the next for nothing."""
    best = max(speeds.values())
    return next(name for name in KERNELS if name in speeds and speeds[name] >= best * (1 - TIE))


def _parse(stored: object, dtype: torch.dtype) -> Choice | None:
    """A cache entry as a Choice, or None if it is malformed or its kernel cannot run here."""
    if not isinstance(stored, dict):
        return None
    kernel, speeds = stored.get("kernel"), stored.get("gbps")
    if kernel not in KERNELS or not isinstance(speeds, dict):
        return None
    if not all(name in KERNELS and isinstance(value, (int, float)) for name, value in speeds.items()):
        return None
    if kernel == PACKED and not packed_available(dtype):
        return None
    return Choice(kernel, {name: float(value) for name, value in speeds.items()})


def apply_onednn_setting() -> None:
    """`CSM_ONEDNN=off`: oneDNN off for the whole process, set once, when csm is imported.

    The only way to PyTorch's portable bf16 mat-vec kernel, the fastest one-row kernel on some
    CPUs (see docs/performance.md), at a price for everything else that oneDNN speeds up: Mimi's
    whole-clip encode and decode ran 1.7x slower here. Off by default; set it before starting
    csm (never switched around a call: every thread reads it). The kernels are then measured
    with oneDNN off (their cache key says so).
    """
    value = os.environ.get(ONEDNN_ENV, "on").strip().lower()
    if value == "off":
        torch.backends.mkldnn.enabled = False
    elif value != "on":
        warnings.warn(f"{ONEDNN_ENV}={value!r} ignored: use on or off", stacklevel=2)


apply_onednn_setting()

_tables: dict[tuple[Path, str], KernelTable] = {}
_tables_lock = threading.Lock()


def default_table() -> KernelTable:
    """The process's table for the current `CSM_KERNEL_CACHE` and `CSM_KERNELS`: one per
    setting, so that each shape is measured once per process at most."""
    setting = (cache_path(), (os.environ.get(POLICY_ENV) or "measure").lower())
    with _tables_lock:
        if setting not in _tables:
            _tables[setting] = KernelTable(*setting)
        return _tables[setting]


def chooses(weight: torch.Tensor) -> bool:
    """Whether a one-row product with `weight` is chosen by measurement: bf16/fp16 on the CPU."""
    return weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16) and weight.dim() == 2
