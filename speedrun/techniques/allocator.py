"""Keep freed memory inside the process instead of handing it back to the OS after every step.

A training step allocates and frees the same large activation and gradient buffers each
iteration. glibc's malloc serves big blocks with ``mmap`` and returns them with ``munmap`` (or
trims the heap top), so every step page-faults memory back in and the kernel zeroes it. PyTorch's
CPU allocator has no cache of its own; the usual fix is an LD_PRELOADed jemalloc/tcmalloc (Intel's
CPU tuning guide). Raising glibc's mmap and trim thresholds with ``mallopt`` gets the same effect
from inside the process, so a recipe can switch it on.

Measured on the default Fashion-MNIST step (2-core EPYC, benchmarks/bench_step.py, BENCHMARKS.md):
it removes ~98% of the page faults (~1,500 -> ~20 per step) but the step time moves by no more than
the machine's noise (median ratio 0.97-1.01x over 5 pairs). Where activations are larger it pays:
``cifar10-cpu``'s evaluation (six TTA views of batches of 1,000 at 32 px, ~90 MB activations that
glibc maps afresh on every forward pass) ran 1.9x faster with it (~850,000 page faults per 1,000
images to none), so that recipe enables it; its training step at batch 256 moved by ~1.05x (noise).

The setting is process-wide and cannot be undone exactly (setting the thresholds back disables
glibc's dynamic threshold, which is worse than never having touched them), so runs that follow
in the same process keep it. ``speedrun ablate`` warns when asked to measure it in-process.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30  # effectively: serve every block from the heap ...
_TRIM_THRESHOLD = (1 << 31) - 1  # ... and never give the heap top back


@functools.cache
def retain_freed_memory() -> bool:
    """Tell glibc malloc to reuse freed blocks rather than unmapping them; True if it took effect.

    A no-op returning False where the C library has no ``mallopt`` (macOS, musl, Windows).
    Idempotent: the first call decides for the whole process.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
