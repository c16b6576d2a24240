"""How fast CSM runs here in each number format, and how close each stays to the reference.

For one mode (a number format, optionally compiled) `benchmark` loads the network, streams a
fixed utterance through `Generator.generate_stream` after a short warm-up, and reports the
load time, the warm-up (kernel set-up, compilation), the time to the first 80 ms of audio,
seconds per streamed frame (a CSM frame plus its Mimi decode step), memory, and, given a
`csm.quality.ScoredSequence`, the teacher-forced logits that `csm.quality.compare` scores.
`csm bench` runs it for every mode asked for and prints the table.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from csm.generator import FRAME_MS, Generator
from csm.inference import ProductKernel, choose_kernels
from csm.loading import load_for_generation
from csm.mimi import Mimi
from csm.model import CSM
from csm.quality import ScoredSequence, teacher_forced_logits
from csm.quantize import MODES as QUANTIZED_FORMATS

# Long enough that a real model keeps talking through the timed frames.
TEXT = (
    "Thanks for calling back. I looked into the order you asked about this morning, and it left "
    "the warehouse yesterday afternoon, so it should reach you by Friday at the latest."
)
SEED = 0
WARMUP_FRAMES = 2
UNQUANTIZED = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Mode:
    """A way to run CSM: weights unquantized in `dtype`, or quantized with activations in `dtype`
    (bfloat16, the only one the quantized kernels take); `compile` compiles its frame step."""

    dtype: torch.dtype
    quantize: str | None = None
    compile: bool = False

    @property
    def format(self) -> str:
        """The number format: "bf16", "int8", ..."""
        return self.quantize or next(name for name, dtype in UNQUANTIZED.items() if dtype == self.dtype)

    @property
    def name(self) -> str:
        return f"{self.format} compiled" if self.compile else self.format


def parse_modes(text: str) -> list[Mode]:
    """Modes from a comma-separated list of fp32, bf16, fp16 (unquantized) and int8, int4
    (bfloat16 activations)."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    known = [*UNQUANTIZED, *QUANTIZED_FORMATS]
    if not names:
        raise ValueError(f"no modes given: name some of {', '.join(known)}")
    modes = []
    for name in names:
        if name not in known:
            raise ValueError(f"unknown mode {name!r}: use {', '.join(known)}")
        mode = Mode(torch.bfloat16, name) if name in QUANTIZED_FORMATS else Mode(UNQUANTIZED[name])
        if mode in modes:
            raise ValueError(f"mode {name!r} is named twice")
        modes.append(mode)
    return modes


def default_modes(dtype: torch.dtype) -> list[Mode]:
    """The unquantized network in `dtype`, then every weight-only quantization."""
    return [Mode(dtype), *(Mode(torch.bfloat16, name) for name in QUANTIZED_FORMATS)]


def with_compiled(modes: list[Mode]) -> list[Mode]:
    """Each mode followed by its compiled twin, to compare them in the same run."""
    return [variant for mode in modes for variant in (mode, dataclasses.replace(mode, compile=True))]


class Progress(Protocol):
    """What `benchmark` reports progress to (a tqdm bar is one)."""

    def set_description(self, description: str) -> object: ...

    def update(self, count: int) -> object: ...


@dataclass(frozen=True)
class Result:
    """What `benchmark` measured for one mode. Memory is None where it cannot be measured."""

    mode: Mode
    load_seconds: float
    warmup_seconds: float
    first_audio_seconds: float
    seconds_per_frame: float
    frames: int
    resident_bytes: int | None
    peak_bytes: int | None
    logits: torch.Tensor | None
    kernels: tuple[ProductKernel, ...] = ()

    @property
    def real_time_factor(self) -> float:
        """Seconds of work per second of audio: below 1 is faster than real time."""
        return self.seconds_per_frame * 1000 / FRAME_MS


def benchmark(
    mode: Mode,
    *,
    model: str | os.PathLike,
    mimi: Mimi,
    tokenizer,
    device: torch.device,
    frames: int,
    sequence: ScoredSequence | None = None,
    progress: Progress | None = None,
) -> Result:
    """Load `model` in `mode`, stream `frames` timed frames, score `sequence` if given.

    Progress counts frames: `WARMUP_FRAMES + frames`, plus the scored ones of `sequence`.
    """
    if frames < 2:
        raise ValueError(f"frames must be at least 2 (the first one is the time to first audio), got {frames}")
    progress = progress or _Silent()
    memory = _Memory(device)
    progress.set_description(f"{mode.name}: loading")
    started = time.perf_counter()
    network = _load(mode, model, device)
    load_seconds = time.perf_counter() - started
    resident = memory.used()
    generator = Generator(network, mimi, tokenizer)

    progress.set_description(f"{mode.name}: warm-up")
    started = time.perf_counter()
    _stream_times(generator, WARMUP_FRAMES, progress)
    warmup_seconds = time.perf_counter() - started

    progress.set_description(f"{mode.name}: streaming")
    times = _stream_times(generator, frames, progress)
    if len(times) < 2:
        raise ValueError(f"the model ended the utterance after {len(times)} frame(s); timing needs at least 2")
    logits = None
    if sequence is not None:
        progress.set_description(f"{mode.name}: quality")
        logits = teacher_forced_logits(network, sequence, progress.update)
    return Result(
        mode=mode,
        load_seconds=load_seconds,
        warmup_seconds=warmup_seconds,
        first_audio_seconds=times[0],
        seconds_per_frame=(times[-1] - times[0]) / (len(times) - 1),
        frames=len(times),
        resident_bytes=resident,
        peak_bytes=memory.peak(),
        logits=logits,
        kernels=tuple(choose_kernels(network, apply=False)),
    )


def teacher_forced(
    mode: Mode,
    *,
    model: str | os.PathLike,
    device: torch.device,
    sequence: ScoredSequence,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Load `model` in `mode` and return its teacher-forced logits on `sequence` (no timing)."""
    progress = progress or _Silent()
    progress.set_description(f"{mode.name}: quality")
    network = _load(mode, model, device)
    return teacher_forced_logits(network, sequence, progress.update)


def _load(mode: Mode, model: str | os.PathLike, device: torch.device) -> CSM:
    network = load_for_generation(model, device=device, dtype=mode.dtype, quantize=mode.quantize, compile=mode.compile)
    _synchronize(device)
    return network


def _stream_times(generator: Generator, frames: int, progress: Progress) -> list[float]:
    """Seconds from the call of `generate_stream` to each frame's audio, on the CPU."""
    started = time.perf_counter()
    times = []
    stream = generator.generate_stream(TEXT, 0, [], max_audio_length_ms=frames * FRAME_MS, seed=SEED)
    for chunk in stream:
        chunk.cpu()  # where a player would take it; waits for the device
        times.append(time.perf_counter() - started)
        progress.update(1)
    return times


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class _Silent:
    def set_description(self, description: str) -> None:
        pass

    def update(self, count: int) -> None:
        pass


class _Memory:
    """Memory taken since construction: bytes on a CUDA device, else the process's resident set.

    The peak on the CPU is Linux's high-water mark, reset through /proc/self/clear_refs;
    where neither is available (other systems, MPS) memory is not measured.
    """

    def __init__(self, device: torch.device):
        gc.collect()
        self._device = device
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            self._available = True
        else:
            self._available = device.type == "cpu" and _reset_peak_rss()
        self._baseline = self._current() if self._available else 0

    def used(self) -> int | None:
        return self._current() - self._baseline if self._available else None

    def peak(self) -> int | None:
        if not self._available:
            return None
        if self._device.type == "cuda":
            return torch.cuda.max_memory_allocated(self._device) - self._baseline
        return _status_bytes("VmHWM") - self._baseline

    def _current(self) -> int:
        if self._device.type == "cuda":
            return torch.cuda.memory_allocated(self._device)
        return _status_bytes("VmRSS")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")
