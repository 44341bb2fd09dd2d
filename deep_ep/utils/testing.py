"""Timing helpers DeepEP's test scripts import from ``deep_ep.utils.testing`` (our implementations).

On CUDA they time with events / the profiler, on CPU with the wall clock, so a
script's benchmark section also runs (and prints plausible numbers) without a GPU.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from ..settings import env_raw

__all__ = ["flush_l2_cache", "bench", "bench_kineto", "empty_suppress", "suppress_stdout_stderr"]

#: Bytes written to evict the GPU's L2 cache between timed runs (larger than any current L2).
L2_FLUSH_BYTES = 256 * 1000 * 1000


def _cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def flush_l2_cache(enabled: bool = True) -> None:
    """Overwrite a buffer larger than the GPU's L2 cache (no-op on CPU or when not ``enabled``).

    Args:
        enabled: whether to do it.
    """
    if enabled and _cuda():
        torch.empty((L2_FLUSH_BYTES // 4,), dtype=torch.int32, device="cuda").zero_()


def bench(
    fn: Callable[[], object],
    num_warmups: int = 50,
    num_tests: int = 50,
    post_fn: Optional[Callable[[], object]] = None,
    flush_l2: bool = True,
) -> Tuple[float, float, float]:
    """Time ``fn``: ``(average, min, max)`` seconds over ``num_tests`` runs after ``num_warmups`` (the first
    timed run is dropped).

    Args:
        fn: the work.
        num_warmups: untimed runs first.
        num_tests: timed runs.
        post_fn: called after each timed run (outside the timing).
        flush_l2: flush the GPU L2 cache before each timed run.

    Returns:
        Three floats, seconds.
    """
    cuda = _cuda()
    if cuda:
        torch.cuda.synchronize()
    for _ in range(num_warmups):
        fn()
    times: List[float] = []
    if cuda:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(num_tests)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(num_tests)]
        for i in range(num_tests):
            flush_l2_cache(flush_l2)
            starts[i].record()
            fn()
            ends[i].record()
            if post_fn is not None:
                post_fn()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    else:
        for _ in range(num_tests):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            if post_fn is not None:
                post_fn()
    times = times[1:] if len(times) > 1 else times
    if not times:
        return 0.0, 0.0, 0.0
    return sum(times) / len(times), min(times), max(times)


class empty_suppress:
    """A context manager that does nothing (the counterpart of :class:`suppress_stdout_stderr`)."""

    def __enter__(self) -> "empty_suppress":
        return self

    def __exit__(self, *_) -> None:
        return None


class suppress_stdout_stderr:
    """Silence this process's stdout and stderr (file descriptors 1 and 2 too, so C++ output as well)."""

    def __enter__(self) -> "suppress_stdout_stderr":
        self._null = open(os.devnull, "w")
        self._saved = [(stream, os.dup(stream.fileno())) for stream in (sys.stdout, sys.stderr)]
        for stream, _ in self._saved:
            stream.flush()
            os.dup2(self._null.fileno(), stream.fileno())
        return self

    def __exit__(self, *_) -> None:
        for stream, fd in self._saved:
            stream.flush()
            os.dup2(fd, stream.fileno())
            os.close(fd)
        self._null.close()


def _kernel_seconds(prof: torch.profiler.profile, name: str) -> Optional[float]:
    """Average device time per launch of the kernels whose name contains ``name`` (None if none ran)."""
    total, count = 0.0, 0
    for evt in prof.key_averages():
        if name not in evt.key:
            continue
        dev_us = getattr(evt, "device_time_total", None)
        if dev_us is None:
            dev_us = getattr(evt, "cuda_time_total", 0.0)
        if dev_us > 0:
            total += dev_us
            count += evt.count
    return total / count / 1e6 if count else None


def bench_kineto(
    fn: Callable[[], object],
    kernel_names: Union[str, Tuple[str, ...]],
    num_tests: int = 30,
    suppress_kineto_output: bool = False,
    trace_path: Optional[str] = None,
    flush_l2: bool = True,
    barrier_comm_profiling: bool = False,
    num_kernels_per_period: int = 1,
    barrier: Optional[Callable[[], object]] = None,
):
    """Average time per call of the named GPU kernels while running ``fn`` ``num_tests`` times.

    On CUDA the profiler's device times of kernels whose name contains each string are averaged per launch.
    A name that matches no kernel (deep_ep's kernels are not DeepEP's), and every name on CPU, gets the
    average wall time of one ``fn`` call instead, so callers never divide by zero.

    Args:
        fn: the work.
        kernel_names: one substring, or a tuple of them.
        num_tests: runs profiled.
        suppress_kineto_output: silence the profiler's output.
        trace_path: also write a Chrome trace there (CUDA only).
        flush_l2: flush the GPU L2 cache before each run.
        barrier_comm_profiling: wait for every rank (``barrier`` or an all-reduce) before each run.
        num_kernels_per_period: kernels of one name per ``fn`` call; > 1 returns per-kernel lists.
        barrier: the barrier to use.

    Returns:
        Seconds: a float for one name, a list for a tuple (lists of ``num_kernels_per_period`` floats when
        it is > 1).
    """
    names = (kernel_names,) if isinstance(kernel_names, str) else tuple(kernel_names)
    if int(env_raw("EP_USE_NVIDIA_TOOLS") or 0):
        return 1 if isinstance(kernel_names, str) else (1,) * len(names)

    def sync_all() -> None:
        if not barrier_comm_profiling:
            return
        if barrier is not None:
            barrier()
        elif dist.is_initialized():
            dist.barrier()

    fn()
    cuda = _cuda()
    found: List[Optional[float]] = [None] * len(names)
    wall = 0.0
    suppress = suppress_stdout_stderr if suppress_kineto_output else empty_suppress
    if cuda:
        torch.cuda.synchronize()
        with suppress():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                for _ in range(num_tests):
                    flush_l2_cache(flush_l2)
                    sync_all()
                    fn()
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t0) / max(num_tests, 1)
        found = [_kernel_seconds(prof, n) for n in names]
        if trace_path is not None:
            prof.export_chrome_trace(trace_path)
    else:
        t = 0.0
        for _ in range(num_tests):
            sync_all()
            t0 = time.perf_counter()
            fn()
            t += time.perf_counter() - t0
        wall = t / max(num_tests, 1)
    out: List[Union[float, List[float]]] = []
    for f in found:
        sec = f if f is not None else wall
        out.append([sec / num_kernels_per_period] * num_kernels_per_period if num_kernels_per_period > 1 else sec)
    return out[0] if isinstance(kernel_names, str) else out
