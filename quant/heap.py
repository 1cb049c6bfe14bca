"""The process heap under glibc: large tensors in their own memory maps, backed by huge pages.

PyTorch's CPU allocator takes every tensor from ``malloc``. glibc serves allocations above its
mmap threshold with their own memory maps (returned to the system on ``free``), but it *raises*
that threshold each time such a map is freed, so that which tensors come from the heap arenas
(where freed memory stays in the process and fragments) changes as the run goes.
:func:`keep_large_allocations_mapped` fixes the threshold (``mallopt(M_MMAP_THRESHOLD)``, which also
turns the dynamic adjustment off), keeps up to ``TRIM_THRESHOLD`` of free memory at the top of the heap
(``M_TRIM_THRESHOLD``) and :func:`trim` hands free heap pages back (``malloc_trim``; the pipeline calls
it once per block, AWQ's search between its phases and the RTN guard after its copy is packed: each phase
frees the last one's transients, but the pieces stay resident until trimmed), but only while the process is
near its peak resident set.

Why only there: a trim lowers the peak only where the resident set is close to it, and every page it hands
back that the next phase uses again is faulted in and zeroed once more. On the example model (AWQ w4 g64,
128 x 512, dev CPU, 2026-12-05) the 240 trims of a run handed back 183-614 MiB each on average (74 GiB in all)
and cost about a tenth of the run: 241-243 s without any trim (peak 2,006-2,042 MiB), 267-270 s trimming every
time (1,400-1,420 MiB), 264 s trimming only within ``NEAR_PEAK`` of the peak (1,447 MiB); one run each, one after
the other (``benchmarks/RESULTS.md``, forty-second session). Where memory is short (a capped run, a model larger
than the machine) the resident set stays near its peak, and every trim happens.

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

Some work leaves debris no trim can return: tokenizing the calibration text allocates per token and keeps a
little of it, scattered over the heap. :func:`in_child` runs such work in a forked child process, whose heap goes
with it. :func:`peak_rss_mb` is the process's peak memory, its children's included.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import resource
import signal
import sys
import threading

from quant.errors import QtoolError

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
MMAP_THRESHOLD = 32 << 20  # bytes: tensors of this size and larger get their own memory maps
TRIM_THRESHOLD = 256 << 20  # bytes of free memory kept at the top of the heap between trims
NEAR_PEAK = 0.9  # trim() hands pages back only while the resident set is at least this share of its peak

_libc = None
_children_peak_mb = 0.0  # the largest peak of a child process that :func:`in_child` ran


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


def trim() -> bool:
    """Return freed heap memory to the system (glibc's ``malloc_trim``) where the process is near its peak: its
    resident set at least ``NEAR_PEAK`` of its high-water mark (``VmRSS`` and ``VmHWM``; always where they cannot
    be read). Returns whether it trimmed.

    Below that the free pages cannot raise the peak, and handing them back costs time: the next block or phase
    faults them in again, zeroed, page by page (the module's docstring has the measurements)."""
    lib = _glibc()
    if not lib:
        return False
    status = _status_fields("VmRSS", "VmHWM")
    if status is not None and len(status) == 2 and status["VmRSS"] < NEAR_PEAK * status["VmHWM"]:
        return False
    lib.malloc_trim(0)
    return True


def peak_rss_mb() -> float:
    """The peak resident set size of this process since it started, or of a child it ran through :func:`in_child`
    if that was larger, MiB: ``VmHWM`` of ``/proc/self/status`` where there is one (Linux), else ``ru_maxrss``.
    A second run in one process reports the larger of the two runs' peaks.

    Not ``ru_maxrss`` on Linux: a process started by ``vfork`` and ``exec`` (Python's ``subprocess`` without a
    ``preexec_fn``) reports its parent's peak there when that was larger, as ``exec`` keeps the replaced memory map's
    high-water mark; a run started from a script that had written a 4.95 GB model said 5,106 MiB
    (``benchmarks/RESULTS.md``, issue 15). ``VmHWM`` is this process's own memory map's. A forked child's peak
    counts the anonymous pages it shares with this process; with this process's file pages added, it is the
    memory the two held while it ran (this process waits meanwhile).
    """
    return max(_own_peak_mb(), _children_peak_mb)


def _own_peak_mb() -> float:
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def _status_fields(*fields: str) -> dict[str, float] | None:
    """``fields`` (kB lines such as ``VmHWM``) of ``/proc/self/status``, read once, MiB each: those the file has;
    None without the file."""
    try:
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) / 2**10 for k, v in (line.split(":", 1) for line in f) if k in fields}
    except OSError:
        return None


def _status_mb(*fields: str) -> float | None:
    """The sum of ``fields`` of ``/proc/self/status`` (:func:`_status_fields`), MiB; None where it has none of them."""
    values = _status_fields(*fields)
    return sum(values.values()) if values else None


class ChildTraceback(Exception):
    """The traceback of an exception raised in :func:`in_child`'s child process, as text: the cause of the
    exception raised again in the parent, so that a traceback shows where in the child it came from."""


def _other_threads() -> list[threading.Thread]:
    """The Python threads alive besides the calling one and tqdm's monitor (a daemon that sleeps between glances
    at the progress bars, which a child never draws)."""
    return [t for t in threading.enumerate()
            if t is not threading.current_thread() and type(t).__module__ != "tqdm._monitor"]


def in_child(fn, *args, what: str | None = None):
    """``fn(*args)`` computed in a forked child process and its (picklable) result returned; an exception
    ``fn`` raises is raised here, caused by a :class:`ChildTraceback` holding the child's traceback. What the
    child allocates never enters this process's heap.

    For work whose allocator debris would outlive it: tokenizing the calibration text leaves the heap
    100-160 MiB larger in tens of thousands of free chunks for 13 MiB more in use, memory the quantization
    after it cannot hand back (``benchmarks/RESULTS.md``, issue 15). The child runs torch on one thread
    (GNU OpenMP is not fork-safe once the parent has used it) and is killed with this process. Runs ``fn`` here
    where there is no ``fork``, the C library is not glibc, the fork fails, or other Python threads run (a child
    forked while another thread holds a lock, the import lock say, waits for it forever: two ``quant.quantize``
    calls from two threads hung). Raises QtoolError naming ``what``
    (``fn``'s name by default) if the child dies without an answer (killed, e.g. out of memory).
    """
    if not hasattr(os, "fork") or not _glibc() or _other_threads():
        return fn(*args)
    read, write = os.pipe()
    parent = os.getpid()
    # The child's own VmHWM holds the anonymous pages it shares with this process, not the mapped files' pages.
    files_mb = _status_mb("RssFile", "RssShmem") or 0.0
    try:
        pid = os.fork()
    except OSError:
        os.close(read)
        os.close(write)
        return fn(*args)
    if pid == 0:  # the child: never returns into the caller's stack
        status = 1
        try:
            os.close(read)
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # killed with its parent (kill -9 included)
            if os.getppid() != parent:  # the parent died before that took effect
                return
            import traceback

            import torch

            torch.set_num_threads(1)
            try:
                answer = (True, fn(*args), None)
            except BaseException as e:  # noqa: BLE001 - handed to the parent as it is
                answer = (False, e, "".join(traceback.format_exception(e)))
            answer = (*answer, _own_peak_mb())
            try:
                data = pickle.dumps(answer)
            except Exception as e:  # noqa: BLE001 - an unpicklable result or exception: its message
                data = pickle.dumps((False, RuntimeError(f"{type(answer[1]).__name__}: {answer[1]}"
                                                          if not answer[0] else f"unpicklable result: {e}"),
                                     answer[2], answer[3]))
            with os.fdopen(write, "wb") as f:
                f.write(data)
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    try:
        with os.fdopen(read, "rb") as f:
            data = f.read()
        try:
            _, wait_status = os.waitpid(pid, 0)
        except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored, or a waitpid(-1) of the caller's)
            wait_status = None
    except BaseException:  # Ctrl-C or an error here: the child does not outlive the call
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
        raise
    if not data:
        code = os.waitstatus_to_exitcode(wait_status) if wait_status is not None else None
        if code is None:
            how = "ended"
        elif code < 0:
            how = f"was killed by signal {-code}" + (" (out of memory?)" if code == -signal.SIGKILL else "")
        else:
            how = f"exited with status {code}"
        raise QtoolError(f"{what or getattr(fn, '__name__', fn)}: the child process doing it {how} before it "
                         "finished")
    global _children_peak_mb
    ok, value, child_traceback, child_peak = pickle.loads(data)
    _children_peak_mb = max(_children_peak_mb, child_peak + files_mb)
    if not ok:
        raise value from (ChildTraceback(child_traceback) if child_traceback else None)
    return value
