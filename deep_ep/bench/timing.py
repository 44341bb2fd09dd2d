"""Timing of one call per BENCH.md.

GPU: CUDA events around the call on the current stream, warm-up first, the L2
flushed before every timed run by writing a scratch buffer (256 MB by
default, larger than any L2 of the cards we use). CPU: ``perf_counter`` around
the call, every rank leaving a barrier together before each run.
Both return per-run times in microseconds; the caller takes the median.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist


def median(values) -> float:
    """Median of a non-empty sequence of numbers."""
    return float(statistics.median(values))


class CudaTimer:
    """Times ``fn()`` with CUDA events, flushing the L2 cache before each timed run."""

    def __init__(self, device: torch.device, flush_bytes: int = 256 << 20):
        """Allocate the flush scratch buffer on ``device`` (``flush_bytes`` 0 disables flushing)."""
        self.device = device
        self.scratch = torch.empty(flush_bytes // 4, dtype=torch.int32, device=device) if flush_bytes > 0 else None

    def flush(self) -> None:
        """Overwrite the scratch buffer so that no input of the next run sits in L2."""
        if self.scratch is not None:
            self.scratch.zero_()

    def __call__(self, fn: Callable[[], object], iters: int, warmup: int) -> list:
        """Run ``fn`` ``warmup`` times, then time ``iters`` runs; per-run microseconds."""
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(self.device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for i in range(iters):
            self.flush()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(self.device)
        return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]


class CpuTimer:
    """Times ``fn()`` with ``time.perf_counter``, with a barrier of ``group`` before each run."""

    def __init__(self, group=None):
        """``group``: the process group whose ranks start each run together (None: no barrier)."""
        self.group = group

    def __call__(self, fn: Callable[[], object], iters: int, warmup: int) -> list:
        """Run ``fn`` ``warmup`` times, then time ``iters`` runs; per-run microseconds."""
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(iters):
            if self.group is not None:
                dist.barrier(group=self.group)
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e6)
        return out


def capture(fn: Callable[[], object]):
    """Run ``fn`` twice on a side stream (the warm-up a capture needs: kernels compiled, buffers made), then
    capture it in a CUDA graph; ``(graph, the outputs of the captured call)`` (refilled by each replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def capture_graph(fn: Callable[[], object]) -> "torch.cuda.CUDAGraph":
    """:func:`capture`, the graph only."""
    return capture(fn)[0]
