"""Shared GPU timing helpers for the kernel benchmarks (CUDA events, CUDA graphs, L2 rotation)."""
from __future__ import annotations

import datetime
import statistics
import sys
import time

import torch

L2_FLUSH_BYTES = 256 * 2**20  # rotate over at least this much so no set is L2-resident (H100 L2: 50 MB)


def rotation_count(bytes_per_set: int, cap: int = 32) -> int:
    """How many input sets to rotate through so that each call misses L2."""
    return max(2, min(cap, -(-L2_FLUSH_BYTES // max(1, bytes_per_set))))


def time_graph(calls, replays: int = 30, warmup: int = 3) -> float:
    """Median µs per call of ``calls`` (a list of closures), captured once into a CUDA graph.

    A graph removes launch gaps between the calls; each closure uses its own inputs (L2 rotation).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in calls:  # warm-up (lazy init, cuBLAS handles, autotuning) outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int = 2**30, spin_s: float = 1.0) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written), GB/s.

    Timed eagerly with events (one copy is ~0.5 ms: launch cost is nothing), median of 30, after
    ``spin_s`` seconds of copies to raise the clocks. Not in a CUDA graph: captured, ``copy_``
    becomes a memcpy node, which measured 2.7 TB/s on an H200 where cuBLAS's GEMV read 3.6."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    start = time.perf_counter()
    while time.perf_counter() - start < spin_s:
        for _ in range(20):
            dst.copy_(src)
        torch.cuda.synchronize()
    times = []
    for _ in range(30):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        dst.copy_(src)
        t1.record()
        t1.synchronize()
        times.append(t0.elapsed_time(t1) * 1e-3)
    del src, dst
    return 2 * nbytes / statistics.median(times) / 1e9


def header(title: str) -> str:
    props = torch.cuda.get_device_properties(0)
    return (f"## {title}\n\n- device: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}\n- date: {datetime.datetime.now().isoformat(timespec='seconds')}\n"
            f"- command: `{' '.join(['python'] + sys.argv)}`\n")


def emit(text: str, out: str | None) -> None:
    """Print a result block and append it to ``out`` (markdown) when given."""
    print(text)
    if out:
        with open(out, "a") as f:
            f.write(text + "\n")
