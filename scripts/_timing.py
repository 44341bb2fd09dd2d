"""Shared by the host-time probes (scripts/ll_probe.py, scripts/host_breakdown.py)."""

import cProfile
import pstats
import time

import torch


def host_profile(label, fn, n=50, rows=18):
    """Print the host time per call of ``fn`` (the GPU kept busy: one synchronize after the batch, also
    reported) and the cProfile of another ``n`` calls sorted by own time."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    print(
        f"== {label}: {(t1 - t0) / n * 1e6:.0f} us host per call ({(time.perf_counter() - t0) / n * 1e6:.0f} "
        f"with the GPU)",
        flush=True,
    )
    pstats.Stats(profile_calls(fn, n)).sort_stats("tottime").print_stats(rows)


def profile_calls(fn, n=50) -> cProfile.Profile:
    """A cProfile of ``n`` calls of ``fn`` (the GPU synchronised after them)."""
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    return pr
