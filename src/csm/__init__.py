"""csm: Sesame's CSM-1B conversational speech model in plain PyTorch.

`import csm` loads the inference stack only; `csm.finetune.train(...)` loads the training stack
on first use, and the server is only imported by `csm serve`.
"""

from __future__ import annotations

import importlib
from typing import Any

from csm.generator import Generator, Segment, load_csm_1b
from csm.mimi import Mimi
from csm.model import CSM
from csm.watermark import Watermarker

__all__ = ["CSM", "Generator", "Mimi", "Segment", "Watermarker", "finetune", "load_csm_1b"]


def __getattr__(name: str) -> Any:
    # The fine-tuning package, imported on first use: see csm/finetune/__init__.py.
    if name == "finetune":
        return importlib.import_module("csm.finetune")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
