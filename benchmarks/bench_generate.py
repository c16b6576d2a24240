"""The Generator end to end: latency of streaming, and what the context cache saves.

    python benchmarks/bench_generate.py [--frames 25] [--turns 4] [--repeats 2] [--tiny] [--workdir DIR]

Random weights (CSM-1B size in bfloat16, or a tiny CSM with --tiny; full-size Mimi and
watermark networks), on the CPU. Random weights never sample the end of speech, so every
utterance runs to `--frames` frames. Reports:
- `generate` (watermarked) against `generate_stream(watermark=False)`: time to the first audio chunk and
  to the last, i.e. how much sooner a listener hears something;
- a conversation of `--turns` turns, each with all earlier turns as context, with the
  content-keyed context cache against re-encoding every context clip on every turn
  (what the reference does), on the same networks in the same run.
Each case is the best of `--repeats` runs (the first run of a new input length also pays
for one-off kernel set-up).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csm import CSM, Generator, Mimi, Segment, Watermarker
from csm.compiled import CompiledCSM
from csm.inference import prepare
from csm.model import CSMConfig
from csm.text import load_tokenizer
from tests.factories.csm import tiny_config
from tests.factories.mimi import write_moshi_checkpoint
from tests.factories.tokenizer import write_tiny_tokenizer
from tests.factories.watermark import write_silentcipher_repo

MIMI_CODES = 2048
TEXTS = ["Hey how are you doing?", "Pretty good, pretty good.", "I'm great, thanks.", "Me too, this is cool."]


def random_csm(
    config: CSMConfig, dtype: torch.dtype, seed: int = 0, quantize: str | None = None, compile: bool = False
) -> CSM:
    """CSM with O(1) activations whose top-k never holds the codes Mimi cannot decode, in the
    inference form that `csm.loading.load_for_generation` gives (fused, quantized with
    `quantize`, its frame step compiled with `compile`)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = (CompiledCSM if compile else CSM)(config)
    model = model.to(dtype).to_empty(device="cpu")
    model.init_buffers()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".scale"):
                parameter.fill_(1.0)
            elif name.endswith("embeddings.weight"):
                parameter.normal_()
            else:
                fan_in = parameter.shape[-2] if name == "audio_head" else parameter.shape[-1]
                parameter.normal_(std=fan_in**-0.5)
        model.codebook0_head.weight[MIMI_CODES:] = 0
        model.audio_head[..., MIMI_CODES:] = 0
    return prepare(model.eval().requires_grad_(False), quantize)


def best_of(repeats: int, measure) -> tuple[float, ...]:
    """Elementwise minimum of the timings `measure()` returns over `repeats` runs."""
    return tuple(min(values) for values in zip(*(measure() for _ in range(repeats))))


def generate_seconds(generator: Generator, max_ms: float) -> tuple[float]:
    started = time.perf_counter()
    generator.generate("Hello from Sesame.", 0, [], max_audio_length_ms=max_ms, seed=1)
    return (time.perf_counter() - started,)


def stream_seconds(generator: Generator, max_ms: float) -> tuple[float, float]:
    """Seconds to the first chunk and to the last, unwatermarked (a marked stream waits for 1.04 s clips)."""
    started = time.perf_counter()
    stream = generator.generate_stream("Hello from Sesame.", 0, [], max_audio_length_ms=max_ms, seed=1, watermark=False)
    next(stream)
    first = time.perf_counter() - started
    for _ in stream:
        pass
    return first, time.perf_counter() - started


def conversation_seconds(make_generator, turns: int, max_ms: float) -> tuple[float]:
    generator = make_generator()
    history: list[Segment] = []
    started = time.perf_counter()
    for turn in range(turns):
        text = TEXTS[turn % len(TEXTS)]
        audio = generator.generate(text, turn % 2, history, max_audio_length_ms=max_ms, seed=turn)
        history.append(Segment(turn % 2, text, audio))
    return (time.perf_counter() - started,)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=25, help="frames per utterance (80 ms each)")
    parser.add_argument("--turns", type=int, default=4, help="turns of the conversation")
    parser.add_argument("--repeats", type=int, default=2, help="runs per case; the best counts")
    parser.add_argument("--tiny", action="store_true", help="a tiny CSM instead of CSM-1B's size")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/csm-bench-generate"))
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    mimi_file = args.workdir / "mimi.safetensors"
    if not mimi_file.is_file():
        write_moshi_checkpoint(mimi_file)
    write_silentcipher_repo(args.workdir / "silentcipher")
    tokenizer = load_tokenizer(write_tiny_tokenizer(args.workdir / "tokenizer.json"))
    config = tiny_config() if args.tiny else CSMConfig()
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = random_csm(config, dtype)
    mimi = Mimi.from_pretrained(mimi_file)
    watermarker = Watermarker.from_pretrained(args.workdir / "silentcipher", device="cpu")
    max_ms = args.frames * 80
    audio_seconds = args.frames * 0.08

    generator = Generator(model, mimi, tokenizer, watermarker)
    generator.generate("Warm up.", 0, [], max_audio_length_ms=160, seed=0)
    (whole,) = best_of(args.repeats, lambda: generate_seconds(generator, max_ms))
    first, last = best_of(args.repeats, lambda: stream_seconds(generator, max_ms))
    (with_cache,) = best_of(
        args.repeats,
        lambda: conversation_seconds(lambda: Generator(model, mimi, tokenizer, watermarker), args.turns, max_ms),
    )
    (without_cache,) = best_of(
        args.repeats,
        lambda: conversation_seconds(
            lambda: Generator(model, mimi, tokenizer, watermarker, context_cache_size=0), args.turns, max_ms
        ),
    )

    size = "tiny CSM, fp32" if args.tiny else "CSM-1B size, bf16"
    print(f"random weights ({size}); Mimi and watermark full size, fp32; {torch.get_num_threads()} CPU threads")
    print(f"{'case':<44} {'seconds':>9} {'real-time factor':>17}")
    rows = [
        (f"generate, {args.frames} frames, until the audio", whole, whole / audio_seconds),
        ("generate_stream, unmarked, until the first chunk", first, None),
        ("generate_stream, unmarked, until the last chunk", last, last / audio_seconds),
        (f"conversation, {args.turns} turns, context cache", with_cache, with_cache / (args.turns * audio_seconds)),
        (f"conversation, {args.turns} turns, re-encoding", without_cache, without_cache / (args.turns * audio_seconds)),
    ]
    for name, seconds, factor in rows:
        print(f"{name:<44} {seconds:>9.2f} {'' if factor is None else f'{factor:.2f}':>17}")
    print(f"first audio: {whole / first:.1f}x sooner streaming than generate")
    print(f"conversation: context cache {without_cache / with_cache:.2f}x faster than re-encoding every turn")


if __name__ == "__main__":
    main()
