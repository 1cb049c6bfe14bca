"""The process heap under glibc: large tensors in their own memory maps, backed by huge pages.

PyTorch's CPU allocator takes every tensor from ``malloc``. glibc serves allocations above its
mmap threshold with their own memory maps (returned to the system on ``free``), but it *raises*
that threshold each time such a map is freed, so that which tensors come from the heap arenas
(where freed memory stays in the process and fragments) changes as the run goes.
:func:`keep_large_allocations_mapped` fixes the threshold (``mallopt(M_MMAP_THRESHOLD)``, which also
turns the dynamic adjustment off), keeps up to ``TRIM_THRESHOLD`` of free memory at the top of the heap
(``M_TRIM_THRESHOLD``) and :func:`trim` hands free heap pages back (``malloc_trim``; the pipeline calls
it once per block, AWQ's search between its phases and the RTN guard after its copy is packed: each phase
frees the last one's transients, but the pieces stay resident until trimmed).

The mmap threshold trades memory for time. Every allocation above it is a fresh map, faulted in and
zeroed by the kernel page by page; below it, freed memory is reused but the heap holds on to it.
On the example model (AWQ w4 g64, 6 of its blocks, 32 calibration windows, dev CPU;
``benchmarks/RESULTS.md``, issue 15) a 1 MiB threshold gave 101 s and 977 MiB peak RSS, 32 MiB
77 s and 1,209 MiB, and 32 MiB with huge pages (the ``qtool`` command sets them up,
:mod:`cli.entry`) 62 s and 1,187 MiB. The default is 32 MiB, the largest glibc accepts: activation-sized temporaries are
reused, and whatever is larger (a block's calibration activations, the searches' chunks) is mapped
and handed back at once.

The trim threshold is glibc's 128 KiB once the mmap threshold is fixed: every free that leaves more than
that at the top of the heap returns it, so the temporaries of each forward were faulted in again on the
next one. That went unseen while long-lived activations sat above them; since the activations passed from
block to block are written over in place (:func:`calib.runner.run_calls`), it cost AWQ on 4 blocks of the
example model 219-220k minor page faults and 6 s of system time, against 198-205k and 3-4 s with the threshold
at 256 MiB (same peak RSS). With both, AWQ on the whole example model took 0.87-0.97x the time of the code
before, at 1,076-1,162 MiB peak RSS instead of 1,418.

Both are no-ops where the C library is not glibc.
"""
from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
MMAP_THRESHOLD = 32 << 20  # bytes: tensors of this size and larger get their own memory maps
TRIM_THRESHOLD = 256 << 20  # bytes of free memory kept at the top of the heap between trims

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
    """Serve allocations of ``threshold`` bytes and more by their own memory maps and keep up to
    ``TRIM_THRESHOLD`` bytes free at the top of the heap, for the rest of the process (this changes the
    allocator of the calling process). Returns whether it took effect."""
    lib = _glibc()
    return (bool(lib) and lib.mallopt(_M_MMAP_THRESHOLD, threshold) == 1
            and lib.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)


def trim() -> None:
    """Return freed heap memory to the system (glibc's ``malloc_trim``)."""
    lib = _glibc()
    if lib:
        lib.malloc_trim(0)

