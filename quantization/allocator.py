"""glibc malloc settings for a training process, set by the process itself.

glibc serves allocations above its mmap threshold with their own mappings, returned to the
OS on free, and smaller ones from the heap. Its threshold is dynamic: after the first large
free it rises (up to 32 MiB), and from then on activations, logits and dequantized layer
weights of a few MiB come from the heap, where fragmentation keeps every step's high-water
mark resident. A fixed 1 MiB threshold (which also turns the dynamic rise off) returns each
freed tensor of 1 MiB or more to the OS. RESULTS.md's 1.1B figures: 3.1 GB peak RSS without
it, 1.84 GiB with it.

The setting used to live only in the systemd unit (`MALLOC_MMAP_THRESHOLD_`), so a plain
`schoolfl agent run`, the demo and every test ran without it; the agent now calls
`configure_training_allocator()` at start. An explicit environment setting still wins.
"""

from __future__ import annotations

import ctypes
import logging
import os

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""mallopt parameter numbers from glibc's malloc.h."""

TRAINING_MMAP_THRESHOLD_BYTES = 1024 * 1024
"""Tensors of 1 MiB or more get their own mapping (returned to the OS when freed)."""

ENVIRONMENT_KEYS = ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def set_malloc_thresholds(mmap_bytes: int, trim_bytes: int | None = None) -> bool:
    """Set glibc's mmap (and optionally trim) threshold; False where libc is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS): nothing to tune
    ok = bool(mallopt(M_MMAP_THRESHOLD, mmap_bytes))
    if trim_bytes is not None:
        ok = bool(mallopt(M_TRIM_THRESHOLD, trim_bytes)) and ok
    return ok


def configure_training_allocator() -> str:
    """Apply the training threshold unless the environment already sets malloc up; returns
    what was done, for the start-up log."""
    overridden = [key for key in ENVIRONMENT_KEYS if os.environ.get(key)]
    if overridden:
        return f"malloc left as the environment sets it ({', '.join(overridden)})"
    if not set_malloc_thresholds(TRAINING_MMAP_THRESHOLD_BYTES):
        return "malloc not tuned (not glibc)"
    return f"malloc mmap threshold fixed at {TRAINING_MMAP_THRESHOLD_BYTES // 1024} KiB"
