"""Timing of one call per docs/bench.md, and the host-side profiles of the tools.

GPU: CUDA events around the call on the current stream, warm-up first, the L2
flushed before every timed run by writing a scratch buffer (256 MB by
default, larger than any L2 of the cards we use). CPU: ``perf_counter`` around
the call, every rank leaving a barrier together before each run.
Both return per-run times in microseconds; the caller takes the median.

Host cost (:func:`host_us`, :func:`host_profile`, :func:`profile_calls`) and the GPU kernels of a call
(:func:`gpu_kernels`) are what the tools of :mod:`deep_ep.tools` report beside it.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist


def median(values) -> float:
    """The median of the values.

    Args:
        values: a non-empty sequence of numbers.

    Returns:
        Their median, a float.
    """
    return float(statistics.median(values))


class CudaTimer:
    """Times ``fn()`` with CUDA events, flushing the L2 cache before each timed run."""

    def __init__(self, device: torch.device, flush_bytes: int = 256 << 20, group=None):
        """Allocate the flush scratch buffer on ``device``.

        Args:
            device: the CUDA device.
            flush_bytes: scratch written before each timed run (0: no flush).
            group: a process group whose ranks start each timed run together (the GPU idle and a barrier
                before each run: both ranks' calls overlap, as in a probe of a link); ``None``: runs are
                queued back to back and synchronised once.
        """
        self.device = device
        self.group = group
        self.scratch = torch.empty(flush_bytes // 4, dtype=torch.int32, device=device) if flush_bytes > 0 else None

    def flush(self) -> None:
        """Overwrite the scratch buffer so that no input of the next run sits in L2."""
        if self.scratch is not None:
            self.scratch.zero_()

    def __call__(self, fn: Callable[[], object], iters: int, warmup: int) -> list:
        """Run ``fn`` ``warmup`` times, then time ``iters`` runs.

        Args:
            fn: the call.
            iters: timed runs.
            warmup: untimed runs first.

        Returns:
            Per-run microseconds.
        """
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(self.device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for i in range(iters):
            if self.group is not None:
                torch.cuda.synchronize(self.device)
                dist.barrier(group=self.group)
            self.flush()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(self.device)
        return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]


class CpuTimer:
    """Times ``fn()`` with ``time.perf_counter``, with a barrier of ``group`` before each run."""

    def __init__(self, group=None):
        """Set up the timer.

        Args:
            group: the process group whose ranks start each run together (``None``: no barrier).
        """
        self.group = group

    def __call__(self, fn: Callable[[], object], iters: int, warmup: int) -> list:
        """Run ``fn`` ``warmup`` times, then time ``iters`` runs.

        Args:
            fn: the call.
            iters: timed runs.
            warmup: untimed runs first.

        Returns:
            Per-run microseconds.
        """
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
    """Capture ``fn`` in a CUDA graph, after running it twice on a side stream (the warm-up a capture
    needs: kernels compiled, buffers made).

    Args:
        fn: the call.

    Returns:
        ``(graph, the outputs of the captured call)`` (refilled by each replay).
    """
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
    """:func:`capture`, the graph only.

    Args:
        fn: the call.

    Returns:
        The ``torch.cuda.CUDAGraph``.
    """
    return capture(fn)[0]


def _sync() -> None:
    """Wait for the current CUDA device, if this process uses CUDA."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def host_us(fn: Callable[[], object], n: int = 200, batches: int = 11, warmup: int = 10) -> float:
    """Host microseconds per call of ``fn``: the median over ``batches`` batches of the mean of
    ``n / batches`` calls each, the GPU kept busy within a batch and synchronised after it (a lent
    machine's host time jitters by tens of percent between batches).

    Args:
        fn: the call.
        n: calls in all.
        batches: batches they are split into.
        warmup: untimed calls first.

    Returns:
        Microseconds.
    """
    for _ in range(warmup):
        fn()
    _sync()
    k = max(n // batches, 1)
    means = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        means.append((time.perf_counter() - t0) / k * 1e6)
        _sync()
    return median(means)


def profile_calls(fn: Callable[[], object], n: int = 50):
    """A cProfile of ``n`` calls of ``fn`` (the GPU synchronised after them).

    Args:
        fn: the call.
        n: calls profiled.

    Returns:
        The ``cProfile.Profile``.
    """
    import cProfile

    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    _sync()
    return pr


def host_profile(label: str, fn: Callable[[], object], n: int = 50, rows: int = 18, out=None) -> None:
    """Print the host time per call of ``fn`` (and with the GPU: one synchronize after the batch), then
    the cProfile of another ``n`` calls sorted by own time.

    Args:
        label: the heading.
        fn: the call.
        n: calls timed, then calls profiled.
        rows: functions shown.
        out: a text stream (default ``sys.stdout``).
    """
    import pstats
    import sys

    out = out or sys.stdout
    for _ in range(5):
        fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    _sync()
    print(
        f"== {label}: {(t1 - t0) / n * 1e6:.0f} us host per call ({(time.perf_counter() - t0) / n * 1e6:.0f} "
        f"with the GPU)",
        file=out,
        flush=True,
    )
    pstats.Stats(profile_calls(fn, n), stream=out).sort_stats("tottime").print_stats(rows)


def gpu_kernels(fn: Callable[[], object], iters: int = 5, rows: int = 25, sort: str = "self_cuda_time_total") -> tuple:
    """The GPU kernels of ``fn`` under the torch profiler.

    Args:
        fn: the call.
        iters: calls profiled.
        rows: rows of the table.
        sort: the table's sort key.

    Returns:
        ``(GPU microseconds per call, summed over its kernels; the profiler's table)``.
    """
    from torch.profiler import ProfilerActivity, profile

    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        _sync()
    ka = prof.key_averages()
    gpu = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in ka) / iters
    return gpu, ka.table(sort_by=sort, row_limit=rows)
