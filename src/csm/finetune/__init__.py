"""Fine-tuning CSM: data, the paper's loss, LoRA and full training, PEFT adapters, merging."""

from csm.finetune.options import FinetuneOptions
from csm.finetune.train import finetune

__all__ = ["FinetuneOptions", "finetune"]
