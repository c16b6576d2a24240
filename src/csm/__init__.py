"""csm: Sesame's CSM-1B conversational speech model in plain PyTorch."""

from csm.generator import Generator, Segment, load_csm_1b
from csm.mimi import Mimi
from csm.model import CSM
from csm.watermark import Watermarker

__all__ = ["CSM", "Generator", "Mimi", "Segment", "Watermarker", "load_csm_1b"]
