"""One LoRA training step of CSM-1B (full size, random weights): ours against transformers + PEFT.

    python benchmarks/bench_finetune.py [--seconds 10] [--threads N]

Both sides hold the same random fp32 weights, LoRA rank 16 on q/k/v/o and the MLPs of the
backbone and the depth decoder, and train on the same conversation (a short text, then
`--seconds` of audio frames and the end-of-audio frame), with the depth decoder on every frame
(transformers' default) so both do the same work. Each step (forward, backward, AdamW) runs
in a fresh process, which reports seconds per step and its peak resident memory while
training (the weights included, the peak of loading them not); the table also
estimates GPU memory for bf16 weights with LoRA and for a full fine-tune.
Needs about 14 GB of free memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_csm import write_random_checkpoint

from csm.model import CSMConfig

TEXT_TOKENS = 24
STEPS = 2


def conversation(seconds: float):
    from csm.finetune.sequences import Example

    frames = round(seconds * 12.5)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.zeros(TEXT_TOKENS + frames + 1, 33, dtype=torch.long)
    tokens[:TEXT_TOKENS, -1] = torch.randint(128_000, (TEXT_TOKENS,), generator=generator)
    tokens[TEXT_TOKENS:-1, :-1] = torch.randint(2048, (frames, 32), generator=generator)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:TEXT_TOKENS, -1] = True
    mask[TEXT_TOKENS:, :-1] = True
    trained = torch.zeros(len(tokens), dtype=torch.bool)
    trained[TEXT_TOKENS:] = True
    end = torch.zeros_like(trained)
    end[-1] = True
    return Example(tokens, mask, trained, end, "bench")


def run_ours(folder: Path, seconds: float) -> float:
    from csm.finetune.batches import collate
    from csm.finetune.lora import DEFAULT_TARGETS, add_lora
    from csm.finetune.loss import loss_terms
    from csm.loading import load_csm

    model = load_csm(folder)
    add_lora(model, DEFAULT_TARGETS, rank=16, alpha=32)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora_" in name)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = collate([conversation(seconds)], ratio=1.0, generator=None)

    def step():
        terms = loss_terms(model, batch)
        (terms.backbone_sum / terms.backbone_tokens + terms.decoder_sum / terms.decoder_tokens).backward()
        optimizer.step()
        optimizer.zero_grad()

    return _timed(step)


def run_transformers(folder: Path, seconds: float) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import CsmConfig, CsmForConditionalGeneration
    from transformers.initialization import no_init_weights

    from csm.finetune.batches import collate
    from csm.layouts import to_transformers_layout
    from csm.loading import load_csm
    from csm.transformers_config import transformers_config

    fields = transformers_config(CSMConfig(), {})
    fields.pop("codec_config")  # transformers' default Mimi; the codec is not run here
    with no_init_weights():  # allocated, never written: our weights replace them
        model = CsmForConditionalGeneration(CsmConfig(**fields))
    # The weights are shared with our loaded model, not copied: one copy in memory.
    ours = load_csm(folder)
    tensors = to_transformers_layout(ours.state_dict(), ours.config)
    missing, _ = model.load_state_dict(tensors, strict=False, assign=True)
    assert all(name.startswith("codec_model.") for name in missing), missing
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # Only the CSM layers, as ours: not the codec's.
    pattern = r"(backbone_model|depth_decoder\.model)\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(targets) + ")"
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=pattern))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = collate([conversation(seconds)], ratio=1.0, generator=None)
    base = model.base_model.model
    embeddings = torch.where(
        batch.mask[..., -1:],
        base.embed_text_tokens(batch.tokens[..., -1]),
        base.backbone_model.embed_tokens(batch.tokens[..., :-1]),
    ).detach()
    labels = torch.full(batch.tokens[..., :-1].shape, -100)
    rows, positions = batch.frames
    labels[rows, positions] = batch.tokens[rows, positions, :-1]

    def step():
        model(inputs_embeds=embeddings, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return _timed(step)


def _timed(step) -> float:
    step()  # warm-up
    _reset_peak_memory()
    started = time.perf_counter()
    for _ in range(STEPS):
        step()
    return (time.perf_counter() - started) / STEPS


def _reset_peak_memory() -> None:
    """Forget the peak of loading: from here on the kernel's high-water mark is the training's."""
    Path("/proc/self/clear_refs").write_text("5")


def _peak_memory_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def gpu_estimates() -> dict[str, float]:
    """GB of weights and optimizer state: LoRA on bf16 frozen weights, and a full fine-tune in fp32 with AdamW.

    Each trained float32 value costs 16 bytes (itself, its gradient, AdamW's two moments).
    """
    from csm.finetune.lora import DEFAULT_TARGETS, add_lora
    from csm.model import CSM

    with torch.device("meta"):
        model = CSM(CSMConfig())
        params = sum(p.numel() for p in model.parameters())
        add_lora(model, DEFAULT_TARGETS, rank=16, alpha=32)
    lora = sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name)
    return {
        f"LoRA rank 16 ({lora / 1e6:.1f} M trained), bf16 weights": (params * 2 + lora * 16) / 1e9,
        "full, fp32 weights + AdamW": params * 16 / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/csm-bench"))
    parser.add_argument("--side", choices=("ours", "transformers"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = write_random_checkpoint(args.workdir / "csm-1b-original", CSMConfig())
    if args.side:
        seconds = (run_ours if args.side == "ours" else run_transformers)(folder, args.seconds)
        print(json.dumps({"seconds": seconds, "peak_gb": _peak_memory_gb()}))
        return
    rows = {}
    for side in ("ours", "transformers"):
        command = [
            sys.executable,
            __file__,
            "--side",
            side,
            "--seconds",
            str(args.seconds),
            "--workdir",
            str(args.workdir),
        ]
        if args.threads:
            command += ["--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows[side] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"one LoRA step, {args.seconds:g} s of audio, fp32 on {torch.get_num_threads()} threads")
    print("| | s/step | peak RSS GB (training) | speed-up |")
    print("|---|---|---|---|")
    for side, label in (("transformers", "transformers + PEFT"), ("ours", "csm")):
        ratio = rows["transformers"]["seconds"] / rows[side]["seconds"]
        print(f"| {label} | {rows[side]['seconds']:.2f} | {rows[side]['peak_gb']:.1f} | {ratio:.2f}x |")
    for what, gigabytes in gpu_estimates().items():
        print(f"GPU memory estimate, {what}: {gigabytes:.1f} GB + activations")


if __name__ == "__main__":
    main()
