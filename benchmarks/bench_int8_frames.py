"""Whole CSM-1B frames in each int8 mode: weight-only "int8" against "int8-dynamic".

    python benchmarks/bench_int8_frames.py [--rows 1,8] [--frames 6] [--threads N] [--bf16]

Builds the full-size network with random weights in memory (no checkpoint on disk), prepares
one copy per mode (`csm.inference.prepare`), feeds each the same 24-position text prompt and
times `CSM.generate_frame` (backbone step + 31 depth steps + sampling; no Mimi) for batches of
each row count. Modes take turns, two frames at a time, so that a shared machine's drift hits
them alike; the median seconds per frame is reported. Needs ~3 GB of memory per mode.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from csm.inference import prepare
from csm.model import CSM, CSMConfig

PROMPT_LENGTH = 24


def random_model(seed: int) -> CSM:
    """CSM-1B in bf16 with weights scaled as trained ones roughly are (activations stay O(1))."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = CSM(CSMConfig())
    for module in model.modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            values = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            if name == "scale":
                values = 1 + 0.1 * values
            elif parameter.dim() >= 2 and "embeddings" not in name:
                values /= parameter.shape[-2 if name == "audio_head" else -1] ** 0.5
            setattr(module, name, torch.nn.Parameter(values.to(torch.bfloat16), requires_grad=False))
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device="cpu")
    model.init_buffers()
    return model.eval()


class Stream:
    """One model's batch of `rows` sequences, frame after frame."""

    def __init__(self, model: CSM, rows: int) -> None:
        self.model = model
        model.setup_caches(rows)
        generator = torch.Generator().manual_seed(1)
        self.tokens = torch.zeros(rows, PROMPT_LENGTH, 33, dtype=torch.long)
        self.tokens[..., -1] = torch.randint(0, 128_000, (rows, PROMPT_LENGTH), generator=generator)
        self.mask = torch.zeros_like(self.tokens, dtype=torch.bool)
        self.mask[..., -1] = True
        self.positions = torch.arange(PROMPT_LENGTH).expand(rows, -1)
        self.generators = [torch.Generator().manual_seed(row) for row in range(rows)]

    def frame(self) -> float:
        started = time.perf_counter()
        frame = self.model.generate_frame(self.tokens, self.mask, self.positions, 0.9, 50, self.generators)
        seconds = time.perf_counter() - started
        self.tokens = torch.cat([frame, frame.new_zeros(frame.shape[0], 1)], dim=1)[:, None]
        self.mask = torch.ones_like(self.tokens, dtype=torch.bool)
        self.mask[..., -1] = False
        self.positions = self.positions[:, -1:] + 1
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--frames", type=int, default=6, help="timed frames per mode and batch size")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--bf16", action="store_true", help="also time the unquantized bf16 model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    modes = (["bf16"] if args.bf16 else []) + ["int8", "int8-dynamic"]
    started = time.perf_counter()
    base = random_model(seed=0)
    print(f"random bf16 weights made in {time.perf_counter() - started:.1f} s", flush=True)
    models = {}
    for mode in modes:
        started = time.perf_counter()
        models[mode] = prepare(copy.deepcopy(base), None if mode == "bf16" else mode)
        print(f"{mode}: prepared in {time.perf_counter() - started:.1f} s", flush=True)
    del base
    print(f"torch {torch.__version__}, {args.threads} threads")
    print("| rows | mode | s/frame (median) | frames/s (all rows) |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        for rows in (int(part) for part in args.rows.split(",")):
            streams = {mode: Stream(model, rows) for mode, model in models.items()}
            for stream in streams.values():
                stream.frame()  # the prompt, and the first call's set-up
            times = {mode: [] for mode in streams}
            while min(len(measured) for measured in times.values()) < args.frames:
                for mode, stream in streams.items():
                    times[mode] += [stream.frame(), stream.frame()]
            for mode, measured in times.items():
                seconds = statistics.median(measured)
                print(f"| {rows} | {mode} | {seconds:.3f} | {rows / seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
