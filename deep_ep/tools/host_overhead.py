"""``host-overhead``: host (Python) cost of each Buffer call, on CPU ranks over gloo at tiny shapes.

For a fresh dispatch (``get_dispatch_layout`` + ``dispatch``), ``get_dispatch_layout`` alone, a cached
dispatch, a combine (of a handle already combined once) and ``fresh+combine`` (a layer's forward: a fresh
dispatch and the first combine of its handle) rank 0 prints:

- host microseconds per call: the median of ``--repeats`` timings of ``--calls`` calls each (T=128, H=64,
  E=16, K=4, so torch compute is negligible; compare medians of several runs, and the counts, which are
  exact);
- Python function calls per call (cProfile);
- torch ops per call: aten ops seen by a ``TorchDispatchMode`` (nested ones included) and top-level ops
  (what Python calls into torch; each costs ~5-15 us of host time on CUDA).

``--check off`` also measures the calls without the metadata exchange of cached dispatch and combine
(what a CUDA Buffer does without ``DEEP_EP_CHECK=1``; a CPU Buffer always exchanges it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from deep_ep.bench.launch import free_port, init_rank, launch

T, H, E, K = 128, 64, 16, 4


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _top_level_ops(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.cpu_parent is None)  # what Python called directly


def _worker(rank: int, world: int, args, port: int, _path) -> None:
    import pstats

    from deep_ep.bench.timing import profile_calls

    init_rank(rank, world, "cpu", port)
    torch.set_num_threads(1)
    import deep_ep

    buf = deep_ep.Buffer(dist.group.WORLD, backend="collective")
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    idx = torch.rand(T, E, generator=g).topk(K, dim=1).indices
    w = torch.rand(T, K, generator=g)

    def fresh():
        a, _, c, d, _ = buf.get_dispatch_layout(idx, E)
        return buf.dispatch(
            x, num_tokens_per_rank=a, is_token_in_rank=d, num_tokens_per_expert=c, topk_idx=idx, topk_weights=w
        )

    def step():  # a layer's forward: a fresh dispatch, then the first combine of its handle
        rx_, _, _, _, h_, _ = fresh()
        return buf.combine(rx_, h_)

    rx, _, _, _, h, _ = fresh()
    ops = {
        "fresh dispatch": fresh,
        "layout only": lambda: buf.get_dispatch_layout(idx, E),
        "cached dispatch": lambda: buf.dispatch(x, handle=h),
        "combine": lambda: buf.combine(rx, h),
        "fresh+combine": step,
    }
    checks = {"both": (True, False), "on": (True,), "off": (False,)}[args.check]
    for check in checks:
        if not hasattr(buf, "_check_every_call"):  # (a private switch; this tool may outlive it)
            if rank == 0:
                print(f"--- check={check}: skipped, this Buffer has no _check_every_call switch", flush=True)
            continue
        buf._check_every_call = check
        if rank == 0:
            print(
                f"--- world={world} metadata check on every call={check} (T={T} H={H} E={E} K={K}; "
                f"median of {args.repeats} x {args.calls} calls)",
                flush=True,
            )
        for name, fn in ops.items():
            for _ in range(20):
                fn()
            dist.barrier()
            ts = []
            for _ in range(args.repeats):
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                ts.append((time.perf_counter() - t0) / args.calls * 1e6)
            dist.barrier()
            ncalls = pstats.Stats(profile_calls(fn, 10)).total_calls / 10
            dist.barrier()
            counter = _OpCounter()
            with counter:
                fn()
            dist.barrier()
            top = _top_level_ops(fn)
            dist.barrier()
            if rank == 0:
                print(
                    f"{name:16s} {statistics.median(ts):8.1f} us/call (min {min(ts):7.1f})  "
                    f"{ncalls:6.0f} py calls  {counter.n:4d} aten ops  {top:4d} top-level ops",
                    flush=True,
                )
    buf.destroy()
    dist.barrier()
    dist.destroy_process_group()


def main(argv, prog: str = "deep-ep tools host-overhead") -> int:
    """Run the tool.

    Args:
        argv: its arguments (``--help`` lists them).
        prog: its name in usage lines.

    Returns:
        The exit status.
    """
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__.split(": ", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--world", type=int, default=1, help="CPU ranks (default 1: this process)")
    p.add_argument("--repeats", type=int, default=5, help="timings per call, median reported (default 5)")
    p.add_argument("--calls", type=int, default=200, help="calls per timing (default 200)")
    p.add_argument("--check", choices=("both", "on", "off"), default="both", help="metadata check on every call")
    a = p.parse_args(argv)
    if a.world == 1:
        _worker(0, 1, a, free_port(), None)
    else:
        launch(_worker, (a.world, a), None, a.world, "cpu", fork_ok=False)
    return 0
