"""Fine-tuning CSM: data, the paper's loss, LoRA and full training, merging.

`csm.finetune.train(data, output, **options)` runs a fine-tune (`csm.finetune.trainer.train`),
with the options of `FinetuneOptions`. Nothing is imported until used, so `import csm` and
`import csm.finetune` stay free of the training stack.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["FinetuneOptions", "train"]

_LAZY = {"FinetuneOptions": "csm.finetune.options", "train": "csm.finetune.trainer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
