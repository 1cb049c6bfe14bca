"""The process heap under glibc: large tensors handed back to the system when freed.

PyTorch's CPU allocator takes every tensor from ``malloc``. glibc serves allocations above its
mmap threshold with their own memory maps (returned to the system on ``free``), but it *raises*
that threshold each time such a map is freed, up to 32 MiB, so that after a few blocks most
activation-sized tensors come from the heap arenas, where freed memory stays in the process and
fragments: the resident size then creeps up with every block. :func:`keep_large_allocations_mapped`
fixes the threshold (``mallopt(M_MMAP_THRESHOLD)``, which also turns the dynamic adjustment
off), and :func:`trim` hands free heap pages back (``malloc_trim``). Both are no-ops where the
C library is not glibc.
"""
from __future__ import annotations

import ctypes

_M_MMAP_THRESHOLD = -3  # glibc malloc.h
MMAP_THRESHOLD = 1 << 20  # bytes: tensors of this size and larger get their own memory maps

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL("libc.so.6")
            lib.malloc_trim.argtypes = [ctypes.c_size_t]
            lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            _libc = lib
        except (OSError, AttributeError):
            _libc = False
    return _libc


def keep_large_allocations_mapped(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve allocations of ``threshold`` bytes and more by their own memory maps, for the rest of the
    process (this changes the allocator of the calling process, which is what bounds its peak
    memory: on the example model AWQ's peak RSS falls by a third). Returns whether it took effect."""
    lib = _glibc()
    return bool(lib) and lib.mallopt(_M_MMAP_THRESHOLD, threshold) == 1


def trim() -> None:
    """Return freed heap memory to the system (glibc's ``malloc_trim``)."""
    lib = _glibc()
    if lib:
        lib.malloc_trim(0)
