"""Would drafting codebooks with a quantized depth decoder speed up exact bf16 frames?

    python benchmarks/bench_speculative.py [--frames 8] [--threads N] [--topk 50] [--temperature 0.9]

Speculative depth decoding: a cheap copy of the depth decoder (int8 or int4) drafts the next
k codebooks, one bf16 pass over those k positions checks them, and the frame keeps the
longest prefix the bf16 decoder would have sampled itself, plus the bf16 code after it. Its
tokens are the bf16 ones only if a pass over several positions gives every position the
logits that one-position steps give. On full-size random weights (seed 0) this measures:

- that precondition: one teacher-forced bf16 pass over a frame's 32 positions against 31
  one-position steps, bit for bit;
- the time of a one-position depth step in bf16, int8 and int4, and of a bf16 pass over
  2 to 6 positions;
- each draft's acceptance: how often, fed the bf16 prefix, it samples the bf16 code with the
  same noise (top-k sampling, and greedy);
- the expected bf16-equivalent time per codebook when drafting k = 1..4 codebooks ahead, with
  acceptances taken as independent: (k drafts + a (k+1)-position pass) / (1 + p + ... + p^k),
  against one bf16 step. Below 1.00x would be a gain.

Random weights give nearly flat distributions, so their acceptances are no guide to the real
model's: rerun this with the real weights (`--model DIR`) before deciding.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_generate import random_csm
from csm.loading import load_for_generation
from csm.model import CSM, CSMConfig
from csm.sampling import sample_topk

FORMATS = ("int8", "int4")


def load(model: str | None, quantize: str | None) -> CSM:
    if model is None:
        loaded = random_csm(CSMConfig(), torch.bfloat16, quantize=quantize)
    else:
        loaded = load_for_generation(model, dtype=torch.bfloat16, quantize=quantize)
    loaded.setup_caches(1)
    return loaded


def seconds(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


@torch.inference_mode()
def step_seconds(model: CSM) -> float:
    hidden = torch.randn(1, 1, model.config.backbone.dim, dtype=torch.bfloat16)
    return seconds(lambda: model.depth_step(hidden, model.depth_positions[:, 5:6], slice(0, 1), model.audio_head[4]))


@torch.inference_mode()
def pass_seconds(model: CSM, positions: int) -> float:
    """A bf16 pass over `positions` depth positions, through the head of each."""
    inputs = torch.randn(1, positions, model.config.backbone.dim, dtype=torch.bfloat16)
    heads = model.audio_head[1 : positions + 1]

    def run():
        hidden = model.decoder(model.projection(inputs), model.depth_positions[:, 1 : 1 + positions], slice(0, 1))
        return torch.einsum("bkd,kdv->bkv", hidden, heads)

    return seconds(run)


@torch.inference_mode()
def one_pass_equals_steps(model: CSM, frames: int) -> bool:
    generator = torch.Generator().manual_seed(1)
    for _ in range(frames):
        last = torch.randn(1, model.config.backbone.dim, generator=generator).to(torch.bfloat16)
        codes = torch.randint(0, 2048, (1, model.config.audio_num_codebooks), generator=generator)
        whole = model.depth_logits(last, codes)
        steps = [logits for _, logits in depth_steps(model, last, list(codes.split(1, dim=1)))]
        if not torch.equal(whole, torch.stack(steps, dim=1)):
            return False
    return True


def depth_steps(model: CSM, last: torch.Tensor, codes: list[torch.Tensor]):
    """(k, logits of codebook k) for k = 1..31, each a one-position step fed codes [1, 1] 0..k-1
    (`codes` may grow while this runs: step k reads codes[k - 1] only once it is asked for)."""
    inputs = torch.cat([last.unsqueeze(1), model.audio_embeddings(codes[0] + model.codebook_offsets[0])], 1)
    positions = model.depth_positions[:, :2]
    for k in range(1, model.config.audio_num_codebooks):
        yield k, model.depth_step(inputs, positions, slice(0, 1), model.audio_head[k - 1])
        inputs = model.audio_embeddings(codes[k] + model.codebook_offsets[k])
        positions = model.depth_positions[:, k + 1 : k + 2]


@torch.inference_mode()
def acceptances(model: CSM, drafts: dict[str, CSM], frames: int, topk: int, temperature: float) -> dict:
    """Per draft: the fraction of codebooks 1..31 where it samples the bf16 code (same noise,
    bf16 prefix), with top-k sampling and greedy."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.zeros(1, 24, 33, dtype=torch.long)
    tokens[..., -1] = torch.randint(0, model.config.text_vocab_size, (1, 24), generator=generator)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[..., -1] = True
    positions = torch.arange(24).unsqueeze(0)
    hits = {(name, mode): 0 for name in drafts for mode in ("sampled", "greedy")}
    total = 0
    for _ in range(frames):
        last = model.backbone_hidden(tokens, mask, positions)[:, -1]
        codes = [sample_topk(model.codebook0_head(last), topk, temperature, generator)]
        steps = {name: depth_steps(draft, last, codes) for name, draft in drafts.items()}
        for _, logits in depth_steps(model, last, codes):
            state = generator.get_state()
            codes.append(sample_topk(logits, topk, temperature, generator))
            for name in drafts:
                _, draft_logits = next(steps[name])
                same_noise = torch.Generator().set_state(state)
                hits[name, "sampled"] += int(sample_topk(draft_logits, topk, temperature, same_noise) == codes[-1])
                hits[name, "greedy"] += int(draft_logits.argmax() == logits.argmax())
            total += 1
        codes = torch.cat(codes, dim=1)
        tokens = torch.cat([codes, codes.new_zeros(1, 1)], dim=1).unsqueeze(1)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[..., -1] = False
        positions = positions[:, -1:] + 1
    return {key: count / total for key, count in hits.items()}


def expected_cost(draft: float, passes: dict[int, float], step: float, acceptance: float, ahead: int) -> float:
    """bf16 steps' worth of time per codebook when drafting `ahead` codebooks at a time."""
    codes_per_round = sum(acceptance**i for i in range(ahead + 1))
    return (ahead * draft + passes[ahead + 1]) / codes_per_round / step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--topk", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--model", help="a CSM checkpoint (default: full-size random weights)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load(args.model, None)
    exact = one_pass_equals_steps(model, frames=2)
    print(f"one bf16 pass over a frame's positions equals one-position steps bit for bit: {exact}")
    step = step_seconds(model)
    passes = {positions: pass_seconds(model, positions) for positions in range(2, 7)}
    drafts = {name: load(args.model, name) for name in FORMATS}
    draft_steps = {name: step_seconds(draft) for name, draft in drafts.items()}
    accepted = acceptances(model, drafts, args.frames, args.topk, args.temperature)

    print(f"\n{args.threads} threads, torch {torch.__version__}, {args.frames} frames")
    print(f"{'depth step':<28}{'ms':>8}{'vs bf16 step':>14}")
    print(f"{'bf16, one position':<28}{step * 1e3:>8.1f}{1:>13.2f}x")
    for positions, time_s in passes.items():
        print(f"{f'bf16, pass of {positions}':<28}{time_s * 1e3:>8.1f}{time_s / step:>13.2f}x")
    for name, time_s in draft_steps.items():
        print(f"{f'{name}, one position':<28}{time_s * 1e3:>8.1f}{time_s / step:>13.2f}x")

    print(f"\n{'draft':<8}{'acceptance':>12}{'greedy':>10}" + "".join(f"{f'k={k}':>9}" for k in range(1, 5)))
    for name in drafts:
        p = accepted[name, "sampled"]
        costs = [expected_cost(draft_steps[name], passes, step, p, k) for k in range(1, 5)]
        print(f"{name:<8}{p:>11.1%}{accepted[name, 'greedy']:>10.1%}" + "".join(f"{cost:>8.2f}x" for cost in costs))
    print("k=N: expected time per codebook drafting N ahead, in one-position bf16 steps (below 1.00x gains)")


if __name__ == "__main__":
    main()
