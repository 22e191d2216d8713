"""Give memory a long step has freed back to the operating system.

Python and numpy free large arrays to glibc's malloc, which keeps the pages of its arenas
(one per thread) for reuse instead of returning them, so a process that reads, quantizes and
drops tensors one after another on two threads keeps its high-water mark in RSS although
little is live. malloc_trim(0) returns those free pages; gc.collect() first frees what only
reference cycles still hold. Callers: the importance-matrix and reference passes (their model
is gone when they return) and the streamed export's writer (every few tensors).
benchmarks/onnx_memory.py --code compares source trees with and without it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_memory() -> bool:
    """Collect garbage, then hand malloc's free pages back to the OS (glibc only).
    True when malloc_trim ran; elsewhere only the collection happens, which is harmless."""
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
