"""SilentCipher-compatible audio watermarking: mark every generated clip, check any file."""

from csm.watermark.message import CSM_KEY
from csm.watermark.watermarker import Watermarker

__all__ = ["CSM_KEY", "Watermarker"]
