"""Large CPU tensors' memory kept in the process between steps (glibc's malloc), for CPU runs.

glibc serves an allocation above its mmap threshold (128 KiB, raised as large blocks are freed,
to at most 32 MiB) with a fresh mmap and unmaps it on free, and trims the heap's free top above
128 KiB. A training step on the CPU allocates and frees activations of tens of MB each (a Unet
decoder at 128 px, batch 32: 16 x 128 x 128 x 32 x 4 B = 33.5 MB a layer), so every step
faults in its memory afresh, the kernel zeroing each 4 KiB page: 270,000 minor page faults and
about 0.5 s of kernel time a step for `quickstart_segment`'s model at 128 px on 2 cores. Raising both
thresholds to 1 GiB keeps freed blocks for the next step, as PyTorch's caching allocator does
on a GPU: `python scripts/bench_malloc.py` measures steps/s with and without.

The price: memory freed stays with the process (its RSS stays at its peak) instead of going back
to the kernel. So it is set only where a model runs on the CPU (training and evaluation). Loader
workers, forked from that process, go back to glibc's own ceiling (blocks over 32 MiB mapped and
unmapped, the heap trimmed above 64 MiB): a worker decoding 50 MP parts (143 MB each) keeps its
memory bounded by what it holds, not by the largest holes its heap ever had.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

THRESHOLD = 1 << 30  # bytes: blocks up to 1 GiB come from (and return to) the heap
# glibc's own ceiling: its dynamic mmap threshold stops at 32 MiB (64-bit), the trim threshold
# follows it at twice that.
WORKER_MMAP, WORKER_TRIM = 32 << 20, 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
_kept = False  # set in this process, and inherited by its forks (loader workers)


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to THRESHOLD in this process (once). False where
    the C library is not glibc (musl, macOS): nothing to do there."""
    global _kept
    if not _kept:
        _kept = _mallopt(THRESHOLD, THRESHOLD)
    return _kept


def bounded_in_worker() -> None:
    """In a loader worker forked from a process that keeps freed memory: glibc's own ceiling
    again (see the module's docstring). Does nothing elsewhere."""
    global _kept
    if _kept:
        _mallopt(WORKER_MMAP, WORKER_TRIM)
        _kept = False


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not (mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and mallopt(_M_TRIM_THRESHOLD, trim_threshold)):
        log.debug("mallopt refused a threshold: glibc keeps its own for it")  # it returns 1 on success
        return False
    return True


def for_model_on(accelerator: str | None) -> bool:
    """In the process that will run a model with this `trainer.accelerator` (training,
    evaluation): keep freed memory where that is the CPU. True if it is kept."""
    return on_cpu(accelerator) and keep_freed_memory()


def on_cpu(accelerator: str | None) -> bool:
    """Does a run with this `trainer.accelerator` put its model on the CPU?"""
    if accelerator == "cpu":
        return True
    if accelerator not in (None, "auto"):
        return False
    import torch

    return not torch.cuda.is_available()
