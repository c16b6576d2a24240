"""Every setting of a fine-tuning run, with its default."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from csm.finetune.lora import DEFAULT_TARGETS


@dataclass(frozen=True)
class FinetuneOptions:
    data: Path
    output: Path
    # model sources and devices, as for `csm say`
    model: str = "sesame/csm-1b"
    mimi: str = "kyutai/moshiko-pytorch-bf16"
    tokenizer: str | None = None
    watermarker: str = "sony/silentcipher"
    device: str | None = None
    # the frozen weights' dtype; default float32, bfloat16 for LoRA on CUDA
    dtype: str | None = None
    # LoRA (rank, alpha = 2 x rank by default) or full fine-tuning
    lora_rank: int = 16
    lora_alpha: float | None = None
    full: bool = False
    targets: tuple[str, ...] = DEFAULT_TARGETS
    # optimisation; the learning rate defaults to 2e-4 for LoRA, 2e-5 for full fine-tuning
    lr: float | None = None
    epochs: int = 1
    steps: int | None = None
    batch_frames: int = 2048
    grad_accum: int = 1
    warmup: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # the loss
    decoder_frame_ratio: float = 1 / 16
    c0_weight: float = 1.0
    decoder_weight: float = 1.0
    seed: int = 0
    # data handling
    on_error: str = "fail"
    cache_dir: Path | None = None
    # evaluation and checkpoints
    eval: Path | None = None
    eval_split: float | None = None
    eval_every: int | None = None
    save_every: int | None = None
    samples: int = 4
    sample_seconds: float = 10.0
    resume: Path | None = None

    def __post_init__(self) -> None:
        # The Python API takes paths as strings too.
        for name in ("data", "output", "cache_dir", "eval", "resume"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value).expanduser())
        object.__setattr__(self, "targets", tuple(self.targets))
        for name in ("lora_rank", "epochs", "batch_frames", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("steps", "eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not 0 < self.decoder_frame_ratio <= 1:
            raise ValueError(f"decoder-frame-ratio must be in (0, 1], got {self.decoder_frame_ratio:g}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr:g}")
        if self.warmup < 0 or self.samples < 0 or self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise ValueError("warmup, samples and weight-decay must not be negative, max-grad-norm must be positive")
        if self.eval is not None and self.eval_split is not None:
            raise ValueError("give --eval or --eval-split, not both")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-5 if self.full else 2e-4)

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    def describe(self) -> dict:
        """The options as JSON-ready values (saved with checkpoints)."""
        return {field.name: _plain(getattr(self, field.name)) for field in fields(self)}


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value
