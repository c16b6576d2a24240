"""Giving the memory that loading freed back to the operating system."""

from __future__ import annotations

import ctypes
import sys


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's `malloc_trim`).

    Loading frees large temporaries (a layer's unpacked int4 codes, a float32 copy before the
    cast) that glibc keeps mapped for reuse, so they would stay in the process's resident
    memory: a third of an int4 model's. Nothing happens without glibc (macOS, musl, Windows).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass
