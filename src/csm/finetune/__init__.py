"""Fine-tuning CSM: data, the paper's loss, LoRA and full training, PEFT adapters, merging.

`csm.finetune(data, output, **options)` calls `csm.finetune.train.finetune`: the package itself
is callable, because `csm.finetune` names both this package and that function, and whichever
of the two is imported first then sets the attribute. Nothing here is imported until used, so
`import csm` (and loading an adapter, which reads `csm.finetune.adapters`) stays free of the
training stack.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__all__ = ["FinetuneOptions", "finetune"]

_LAZY = {"FinetuneOptions": "csm.finetune.options", "finetune": "csm.finetune.train"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CallablePackage(types.ModuleType):
    def __call__(self, data, output, **options):
        """Fine-tune CSM: see `csm.finetune.train.finetune`."""
        from csm.finetune.train import finetune

        return finetune(data, output, **options)


sys.modules[__name__].__class__ = _CallablePackage
