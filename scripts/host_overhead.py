"""Host (Python) overhead of a Buffer call, measured on CPU with gloo at tiny shapes.

python scripts/host_overhead.py [--world 1|2] [--repeats 5] [--calls 200] [--check both|on|off]

For a fresh dispatch (``get_dispatch_layout`` + ``dispatch``), ``get_dispatch_layout`` alone, a
cached dispatch, a combine (of a handle already combined once) and ``fresh+combine`` (a layer's
forward: a fresh dispatch and the first combine of its handle, which builds the handle's combine
state) it prints, on rank 0:

- host microseconds per call: the median of ``--repeats`` timings of ``--calls`` calls each
  (shapes are tiny, T=128, H=64, E=16, K=4, so torch compute is negligible; the machine may be
  noisy: compare medians of several runs, and the counts below, which are exact);
- Python function calls per call (cProfile);
- torch ops per call: aten ops seen by a ``TorchDispatchMode`` (every op the dispatcher runs,
  nested ones included) and top-level ops (what Python calls into torch; each costs ~5-15 us of
  host time on CUDA).

``--check`` picks ``Buffer._check_every_call`` (on by default on CPU: cached dispatch and combine
then exchange metadata too, as with ``DEEP_EP_CHECK=1`` on CUDA).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

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
    events = prof.events()
    # Top-level: events whose CPU parent is None (what Python called directly).
    return sum(1 for e in events if e.cpu_parent is None)


def _worker(rank: int, world: int, args) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(args.port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
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

    rx, ri, rw, lst, h, _ = fresh()
    ops = {
        "fresh dispatch": fresh,
        "layout only": lambda: buf.get_dispatch_layout(idx, E),
        "cached dispatch": lambda: buf.dispatch(x, handle=h),
        "combine": lambda: buf.combine(rx, h),
        "fresh+combine": step,
    }
    checks = {"both": (True, False), "on": (True,), "off": (False,)}[args.check]
    for check in checks:
        buf._check_every_call = check
        if rank == 0:
            print(
                f"--- world={world} _check_every_call={check} (T={T} H={H} E={E} K={K}; "
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
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(10):
                fn()
            prof.disable()
            ncalls = pstats.Stats(prof).total_calls / 10
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
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--check", choices=("both", "on", "off"), default="both")
    p.add_argument("--port", type=int, default=29613)
    args = p.parse_args()
    if args.world == 1:
        _worker(0, 1, args)
    else:
        mp.spawn(_worker, args=(args.world, args), nprocs=args.world)


if __name__ == "__main__":
    main()
