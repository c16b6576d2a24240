"""`csm finetune` and `csm merge`: train CSM on your own recordings, merge a LoRA adapter."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_commands(commands) -> None:
    from csm.finetune.lora import DEFAULT_TARGETS, HEAD_TARGETS, LAYER_TARGETS
    from csm.finetune.merge import LAYOUTS

    finetune = commands.add_parser(
        "finetune",
        help="fine-tune CSM on your own recordings (LoRA or full)",
        description="Fine-tune CSM on DATA: a JSONL manifest, one conversation per line "
        '({"segments": [{"audio": "a.wav", "text": "...", "speaker": 0, "train": true}, ...]}, paths '
        "relative to the manifest), or a folder of audio files each with a .txt transcript beside it. "
        "LoRA runs write a PEFT adapter into OUT (use it with csm say --adapter OUT), full runs a "
        "checkpoint (csm say --model OUT). Quantized (QLoRA) training is not supported.",
    )
    finetune.add_argument("data", type=Path, help="training data: a JSONL manifest or a folder of clips")
    finetune.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        metavar="OUT",
        help="folder for the result, log, samples and checkpoints",
    )
    for name, default, help_text in (
        ("--model", "sesame/csm-1b", "CSM weights to start from: hub repo, folder or file"),
        ("--mimi", "kyutai/moshiko-pytorch-bf16", "Mimi codec weights: hub repo, folder or file"),
        ("--tokenizer", None, "text tokenizer: hub repo, folder or tokenizer.json (default: the model's)"),
        ("--watermarker", "sony/silentcipher", "watermark weights, for the eval samples"),
    ):
        finetune.add_argument(name, default=default, metavar="SOURCE", help=help_text)
    finetune.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    finetune.add_argument("--dtype", help="dtype of the frozen weights (default float32; bfloat16 for LoRA on CUDA)")
    finetune.add_argument("--lora-rank", type=int, default=16, metavar="R", help="LoRA rank (default 16)")
    finetune.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA alpha (default 2 x rank)")
    finetune.add_argument("--full", action="store_true", help="train every weight instead of a LoRA adapter")
    finetune.add_argument(
        "--targets",
        type=lambda text: tuple(text.split(",")),
        default=DEFAULT_TARGETS,
        metavar="NAMES",
        help=f"comma-separated LoRA targets in both the backbone and the depth decoder (default {','.join(DEFAULT_TARGETS)}; "
        f"known: {','.join(LAYER_TARGETS + HEAD_TARGETS)})",
    )
    finetune.add_argument("--lr", type=float, help="peak learning rate (default 2e-4 for LoRA, 2e-5 with --full)")
    finetune.add_argument("--epochs", type=int, default=1, help="passes over the data (default 1)")
    finetune.add_argument("--steps", type=int, help="optimizer steps to run instead of --epochs")
    finetune.add_argument(
        "--batch-frames",
        type=int,
        default=2048,
        metavar="N",
        help="positions per batch, padding included (default 2048)",
    )
    finetune.add_argument(
        "--grad-accum", type=int, default=1, metavar="N", help="batches per optimizer step (default 1)"
    )
    finetune.add_argument(
        "--warmup",
        type=int,
        default=10,
        metavar="STEPS",
        help="linear warm-up steps before the cosine decay (default 10)",
    )
    finetune.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    finetune.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (default 1)")
    finetune.add_argument(
        "--decoder-frame-ratio",
        type=float,
        default=1 / 16,
        metavar="R",
        help="share of each sequence's frames the depth decoder learns from (default 1/16; at least one, end of audio always)",
    )
    finetune.add_argument(
        "--c0-weight", type=float, default=1.0, help="weight of the backbone (codebook 0) term (default 1)"
    )
    finetune.add_argument(
        "--decoder-weight", type=float, default=1.0, help="weight of the depth-decoder term (default 1)"
    )
    finetune.add_argument(
        "--seed", type=int, default=0, help="seed of the data order, LoRA init and frame choice (default 0)"
    )
    finetune.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="a broken data entry fails the run (default) or is skipped with a message",
    )
    finetune.add_argument(
        "--cache-dir", type=Path, metavar="DIR", help="where Mimi codes are cached (default ~/.cache/csm/codes)"
    )
    evaluation = finetune.add_mutually_exclusive_group()
    evaluation.add_argument("--eval", type=Path, metavar="DATA", help="evaluation data, in either form")
    evaluation.add_argument(
        "--eval-split", type=float, metavar="F", help="hold out this share of the conversations for evaluation"
    )
    finetune.add_argument(
        "--eval-every", type=int, metavar="STEPS", help="evaluate every STEPS steps (always at the end)"
    )
    finetune.add_argument(
        "--save-every", type=int, metavar="STEPS", help="save a resumable checkpoint every STEPS steps"
    )
    finetune.add_argument(
        "--samples",
        type=int,
        default=4,
        metavar="N",
        help="eval prompts spoken into OUT/samples at each eval (default 4)",
    )
    finetune.add_argument(
        "--sample-seconds", type=float, default=10.0, metavar="S", help="length limit of each sample (default 10)"
    )
    finetune.add_argument(
        "--resume", type=Path, metavar="CHECKPOINT", help="continue exactly from OUT/checkpoint of an earlier run"
    )
    finetune.set_defaults(run=_finetune)

    merge = commands.add_parser(
        "merge",
        help="merge a LoRA adapter into a full checkpoint",
        description="Write MODEL with ADAPTER merged into OUT: original layout (model.safetensors + config.json, "
        "for csm), or transformers' CsmForConditionalGeneration layout.",
    )
    merge.add_argument("model", metavar="MODEL", help="CSM weights: hub repo, folder or file")
    merge.add_argument("adapter", metavar="ADAPTER", help="LoRA adapter (PEFT format): hub repo, folder or file")
    merge.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="folder to write")
    merge.add_argument("--layout", choices=LAYOUTS, default="original", help="checkpoint layout (default original)")
    merge.add_argument(
        "--codec",
        default="kyutai/mimi",
        metavar="SOURCE",
        help="with --layout transformers and a MODEL without a bundled codec: Mimi in the kyutai/mimi layout",
    )
    merge.set_defaults(run=_merge)


def _finetune(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from csm.finetune import FinetuneOptions
    from csm.finetune.trainer import run

    run(FinetuneOptions(**{field.name: getattr(args, field.name) for field in fields(FinetuneOptions)}))
    print(f"csm: fine-tuned into {args.output}", file=sys.stderr)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from csm.finetune.merge import merge

    written = merge(args.model, args.adapter, args.output, layout=args.layout, codec=args.codec)
    print(f"csm: wrote {written}", file=sys.stderr)
    return 0
