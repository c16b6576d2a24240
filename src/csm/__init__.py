"""csm: Sesame's CSM-1B conversational speech model in plain PyTorch."""

from csm.generator import Generator, Segment, load_csm_1b

# The function, not its package: `csm.finetune(...)`; the modules stay importable as
# `from csm.finetune.<module> import ...`.
from csm.finetune import finetune
from csm.mimi import Mimi
from csm.model import CSM
from csm.watermark import Watermarker

__all__ = ["CSM", "Generator", "Mimi", "Segment", "Watermarker", "finetune", "load_csm_1b"]
