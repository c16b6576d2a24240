"""The continuous-batching engine: throughput by concurrency, time to first audio, voice cache.

    python benchmarks/bench_engine.py [--frames 12] [--concurrency 1,2,4,8,16] [--quantize int8|int4] [--tiny]

Random weights of CSM-1B's size in bfloat16 (weight-only int8/int4 with --quantize; a tiny CSM
in float32 with --tiny), in the inference form `csm.loading.load_for_generation` gives, and a full-size
Mimi, no watermark (the engine streams unwatermarked audio). Random weights never sample the
end of speech, so every request runs to `--frames` frames. Reports:
- for N concurrent requests (submitted together to an engine of N rows): frames per second
  over the whole run (prefills included), its ratio to N = 1, the mean and worst time to first
  audio, the wall time, and what a turn's steps cost apart: the CSM step of N rows and the
  Mimi step of N rows (the rest of a turn is prefill and the engine's own overhead);
- the voice cache: time to first audio of a request with a 10 s voice prompt when the voice
  is new and when it is cached (one request at a time), with the cache off for comparison;
- bf16 batching agreement: for 8 seeded requests made together by `generate_batch`, the first
  frame at which each differs from `generate` alone (float32 agrees exactly; bf16 kernels
  may round a row differently at another batch size).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import random_csm

from csm import Generator, Mimi, Segment
from csm.batching import PREFILL_CHUNK, CacheRows
from csm.engine import Engine, Request
from csm.model import CSMConfig
from csm.text import load_tokenizer
from csm.threads import run_in_fresh_thread
from tests.factories.csm import tiny_config
from tests.factories.mimi import write_moshi_checkpoint
from tests.factories.tokenizer import write_tiny_tokenizer

TEXT = "Hello there, how are you today?"
VOICE_TEXT = "Speech models turn text into sound, one frame at a time. " * 4


def voice_clip(seconds: float) -> torch.Tensor:
    """A deterministic, speech-like signal of `seconds` at 24 kHz."""
    t = torch.arange(int(seconds * 24_000)) / 24_000
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(0))
    return (0.3 * torch.sin(2 * torch.pi * 180 * t) * torch.sin(2 * torch.pi * 3 * t) + 0.01 * noise).float()


def serve(engine: Engine, requests: list[Request]) -> tuple[float, list[float]]:
    """Submit `requests` together; wall seconds until all are done, and each one's time to first audio."""

    def consume(handle) -> float:
        started = time.perf_counter()
        first = None
        for _ in handle:
            first = first or time.perf_counter() - started
        return first

    started = time.perf_counter()
    handles = [engine.submit(request) for request in requests]
    with ThreadPoolExecutor(len(handles)) as pool:
        firsts = list(pool.map(consume, handles))
    return time.perf_counter() - started, firsts


def step_seconds(generator: Generator, rows: int, repeats: int = 3) -> tuple[float, float]:
    """Seconds of one batched CSM step of `rows` rows, and of one Mimi step of as many rows."""
    model = generator.model
    model.setup_caches(rows)
    cache_rows = CacheRows(model)
    prompt = generator.prompt(TEXT, 0, [])
    first = cache_rows.start(prompt, generator.sampling(10_000, 0.9, 50, 0), 0)
    while first.last is None:
        cache_rows.prefill(first)
    utterances = [first]
    for row in range(1, rows):  # the same prompt in every row: copies of the first
        model.copy_cache_row(0, row, first.written)
        utterance = cache_rows.start(prompt, generator.sampling(10_000, 0.9, 50, row), row)
        utterance.prefilled, utterance.frames, utterance.last = first.prefilled, first.frames, first.last
        utterances.append(utterance)
    cache_rows.decode(utterances)
    started = time.perf_counter()
    for _ in range(repeats):
        cache_rows.decode(utterances)
    csm_seconds = (time.perf_counter() - started) / repeats
    stream = generator.mimi.decode_stream(rows)
    codes = torch.randint(2048, (rows, 32, 1))
    stream.step(codes)
    started = time.perf_counter()
    for _ in range(repeats):
        stream.step(codes)
    model.setup_caches(1)
    return csm_seconds, (time.perf_counter() - started) / repeats


def prefill_chunk_seconds(generator: Generator, prompt) -> float:
    """Seconds of the first full prefill chunk of `prompt`, in row 0: what it adds to a turn."""
    generator.model.setup_caches(1)
    utterance = CacheRows(generator.model).start(prompt, generator.sampling(240, 0.9, 50, 0), 0)
    CacheRows(generator.model).prefill(utterance)  # warm up this shape
    utterance.prefilled = 0
    started = time.perf_counter()
    CacheRows(generator.model).prefill(utterance)
    return time.perf_counter() - started


def first_audio_seconds(generator: Generator, request: Request) -> float:
    with Engine(generator, max_batch=1) as engine:
        _, [first] = serve(engine, [request])
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=12, help="frames per request (80 ms each)")
    parser.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated numbers of concurrent requests")
    parser.add_argument("--voice-seconds", type=float, default=10.0, help="length of the cached voice prompt")
    parser.add_argument("--quantize", choices=("int8", "int4"), help="weight-only quantized CSM (bf16 activations)")
    parser.add_argument("--tiny", action="store_true", help="a tiny CSM in float32 instead of CSM-1B's size in bf16")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/csm-bench-engine"))
    args = parser.parse_args()
    levels = [int(level) for level in args.concurrency.split(",")]

    args.workdir.mkdir(parents=True, exist_ok=True)
    mimi_file = args.workdir / "mimi.safetensors"
    if not mimi_file.is_file():
        write_moshi_checkpoint(mimi_file)
    tokenizer = load_tokenizer(write_tiny_tokenizer(args.workdir / "tokenizer.json"))
    config, dtype = (tiny_config(), torch.float32) if args.tiny else (CSMConfig(), torch.bfloat16)
    # Built, and measured outside the engine, on threads that end, as `load_csm_1b` loads: the
    # engine's thread is then the only one holding OpenMP workers (see csm.threads).
    model = run_in_fresh_thread(random_csm, config, dtype, quantize=args.quantize)
    mimi = run_in_fresh_thread(Mimi.from_pretrained, mimi_file)
    generator = Generator(model, mimi, tokenizer)
    size = "tiny CSM, fp32" if args.tiny else f"CSM-1B size, {args.quantize or 'bf16'}"
    print(f"random weights ({size}), Mimi full size fp32, {torch.get_num_threads()} CPU threads, {args.frames} frames")

    max_ms = args.frames * 80
    print(
        f"\n{'concurrent':>10} {'frames/s':>9} {'vs 1':>6} {'TTFA mean s':>12} {'TTFA max s':>11} "
        f"{'CSM step s':>11} {'Mimi step s':>12} {'wall s':>7}"
    )
    first_audio_seconds(generator, Request("Warm up.", 0, (), 240, seed=0))
    base = None
    for level in levels:
        # An engine of as many rows as requests: its Mimi step decodes every row, in use or not.
        with Engine(generator, max_batch=level, max_queue=0) as engine:
            wall, firsts = serve(engine, [Request(TEXT, i % 2, (), max_ms, seed=i) for i in range(level)])
        csm_step, mimi_step = run_in_fresh_thread(step_seconds, generator, level)
        rate = level * args.frames / wall
        base = base or rate
        print(
            f"{level:>10} {rate:>9.2f} {rate / base:>5.2f}x {statistics.mean(firsts):>12.2f} {max(firsts):>11.2f} "
            f"{csm_step:>11.3f} {mimi_step:>12.3f} {wall:>7.2f}",
            flush=True,
        )

    # Torch work off the main thread throughout, as above.
    voice = [Segment(1, VOICE_TEXT, run_in_fresh_thread(voice_clip, args.voice_seconds))]
    request = Request(TEXT, 1, voice, max_audio_length_ms=240, seed=1)
    cached = Generator(model, mimi, tokenizer)
    uncached = Generator(model, mimi, tokenizer, prefix_cache_bytes=0)
    new = first_audio_seconds(cached, request)
    again = first_audio_seconds(cached, request)
    first_uncached = first_audio_seconds(uncached, request)
    again_uncached = first_audio_seconds(uncached, request)
    prompt = run_in_fresh_thread(generator.prompt, TEXT, 1, voice)
    print(
        f"\nvoice cache, {args.voice_seconds:g} s voice prompt ({prompt.prefixes[0][0]} of {len(prompt)} positions), "
        f"time to first audio, one request at a time:"
    )
    print(f"  cache on:  first request {new:.2f} s, second {again:.2f} s ({new / again:.1f}x lower)")
    print(
        f"  cache off: first request {first_uncached:.2f} s, second {again_uncached:.2f} s "
        f"(context codes cached, positions prefilled again)"
    )
    print(f"  cached state: {cached.prefix_cache.nbytes / 2**20:.1f} MiB")
    chunk = run_in_fresh_thread(prefill_chunk_seconds, generator, prompt)
    print(
        f"prefill: one chunk of {PREFILL_CHUNK} positions takes {chunk:.3f} s (what admitting a long prompt adds to a turn)"
    )

    texts = [f"{TEXT} Number {i}." for i in range(8)]
    batch = generator.generate_batch(texts, [i % 2 for i in range(8)], [[]] * 8, max_ms, seeds=list(range(8)))
    agreement = []
    for i, audio in enumerate(batch):
        alone = generator.generate(texts[i], i % 2, [], max_ms, seed=i)
        frames = min(len(audio), len(alone)) // 1920
        same = [torch.equal(audio[f * 1920 : (f + 1) * 1920], alone[f * 1920 : (f + 1) * 1920]) for f in range(frames)]
        agreement.append(same.index(False) if False in same else frames)
    print(
        f"\nbatching agreement ({str(dtype).removeprefix('torch.')}, 8 rows vs alone, {args.frames} frames): "
        f"frames equal before the first difference, per row: {agreement}"
    )


if __name__ == "__main__":
    main()
