"""Keeping glibc's allocator from hoarding the memory a quantized base frees.

A quantized layer multiplies by a float block of its weight dequantized for the purpose and freed right
after, many times per step. glibc's malloc serves a large request with its own memory map and unmaps it
when freed, until the first such free: then it raises its mmap threshold to that size (up to 32 MiB), and
later blocks come from its heap, where freed memory stays in the process. With the saved activations of a
training step placed between them, the heap fragments and grows. Measured on a ~1B Llama with an int8 base
(batch 1 x 128, docs/quantization.md): a step's peak grew by 1.1-1.7 GB over the loaded model with the
threshold left alone, and by about 0.35 GB with it fixed at 1 MiB.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from typing import Any

MMAP_THRESHOLD = 1 << 20  # bytes: a block this large or larger gets its own memory map, unmapped when freed
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def _libc() -> Any:
    """glibc, or None where there is none (macOS, musl): nothing to tune there."""
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_LIBC = _libc()


def release_freed_memory() -> None:
    """Give memory freed to glibc's heap back to the system (``malloc_trim``)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def return_large_blocks() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD`, so that every large freed block (a dequantized
    weight block, a logits chunk, an activation) goes back to the system at once instead of staying in a
    fragmenting heap. Process-wide and idempotent; left alone when the user set ``MALLOC_MMAP_THRESHOLD_``
    (glibc's own tuning variable). Returns whether the threshold is now fixed here."""
    if _LIBC is None or os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        return False
    with contextlib.suppress(OSError, AttributeError):
        return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return False
