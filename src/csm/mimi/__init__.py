"""The Mimi neural audio codec: 24 kHz mono audio <-> 12.5 Hz frames of 32 codes."""

from csm.mimi.codec import DecodeStream, EncodeStream, Mimi
from csm.mimi.config import MimiConfig

__all__ = ["DecodeStream", "EncodeStream", "Mimi", "MimiConfig"]
