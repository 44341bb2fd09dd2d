"""``host-breakdown``: where the host time of the nvlink device path goes, on one GPU (one rank).

The host cost of single launches (torch ops, events, ``record_stream``, the scatter / copy-out Triton
kernels where this version has them) and of whole calls (layout, fresh ``num_worst_tokens`` dispatch,
host-path dispatch, cached dispatch, combine), the GPU time of the device path (graph-replayed), then a
cProfile and a torch-profiler op count of a fresh ``num_worst_tokens`` dispatch and its combine. What
``docs/perf-notes.md`` quotes for session 16; ``scripts/ab.sh`` runs it against a base tree.
"""

from __future__ import annotations

import argparse
import pstats
import sys

import torch
import torch.distributed as dist

from deep_ep.bench.launch import init_single_rank
from deep_ep.bench.timing import CudaTimer, capture, host_us, median, profile_calls


def main(argv, prog: str = "deep-ep tools host-breakdown") -> int:
    """Run the tool.

    Args:
        argv: its arguments (``--help`` lists them).
        prog: its name in usage lines.

    Returns:
        The exit status.
    """
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].split(": ", 1)[-1])
    p.add_argument("tokens", type=int, nargs="?", default=1024, help="tokens (default 1024)")
    p.add_argument("hidden", type=int, nargs="?", default=2048, help="hidden size (default 2048)")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--backend", default="nvlink")
    a = p.parse_args(argv)
    init_single_rank("cuda")
    import deep_ep

    T, H, E, K = a.tokens, a.hidden, a.experts, a.topk
    buf = deep_ep.Buffer(dist.group.WORLD, backend=a.backend)
    x = torch.randn((T, H), device="cuda").to(torch.bfloat16)
    idx = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)])
    w = torch.rand((T, K), device="cuda")

    def per_call(label, fn, n=200):
        print(f"{label:58s} {host_us(fn, n):8.1f} us host per call", flush=True)

    small = torch.zeros(16, device="cuda")
    per_call("torch.empty((16,))", lambda: torch.empty(16, device="cuda"))
    per_call("small.add_(1)", lambda: small.add_(1))
    srcw = x.view(torch.int64)
    dst = torch.empty((T, H // 4), dtype=torch.int64, device="cuda")
    per_call("index_select of rows", lambda: torch.index_select(srcw, 0, idx[:, 0], out=dst))
    per_call("t.record_stream(s)", lambda: small.record_stream(torch.cuda.current_stream()))
    per_call("Event() + record", lambda: torch.cuda.Event().record())
    per_call("torch.cuda.is_current_stream_capturing()", torch.cuda.is_current_stream_capturing)
    _kernel_launches(per_call, srcw, dst, T)
    per_call("get_dispatch_layout", lambda: buf.get_dispatch_layout(idx, E))
    lay = buf.get_dispatch_layout(idx, E)

    def fresh(worst, async_finish=True):
        per_rank, _, per_expert, in_rank, _ = lay
        return buf.dispatch(
            x,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=idx,
            topk_weights=w,
            num_worst_tokens=worst,
            async_finish=async_finish,
        )

    rx, _, _, _, handle, _ = fresh(T)
    rx0, _, _, _, handle0, _ = fresh(0)
    per_call("fresh dispatch, num_worst_tokens (device path)", lambda: fresh(T))
    per_call("fresh dispatch, counts read on the host", lambda: fresh(0), n=100)
    per_call("cached dispatch (host handle)", lambda: buf.dispatch(x, handle=handle0))
    per_call("combine of a device-path handle", lambda: buf.combine(rx, handle, async_finish=True))
    per_call("combine of a host handle", lambda: buf.combine(rx0, handle0, async_finish=True))

    timer = CudaTimer(x.device, flush_bytes=0)
    for label, fn in (
        ("fresh dispatch, num_worst_tokens", lambda: fresh(T, False)),
        ("get_dispatch_layout", lambda: buf.get_dispatch_layout(idx, E)),
        ("combine, device handle", lambda: buf.combine(rx, handle)),
    ):
        graph, _ = capture(fn)
        gpu = median(timer(graph.replay, 50, 3))
        print(f"{'graph-replayed ' + label:58s} {gpu:8.1f} us GPU", flush=True)
        del graph

    for label, fn in (
        ("fresh dispatch, num_worst_tokens", lambda: fresh(T)),
        ("fresh dispatch, host", lambda: fresh(0)),
        ("combine, device handle", lambda: buf.combine(rx, handle, async_finish=True)),
    ):
        pr = profile_calls(fn, 50)
        print(f"\n===== cProfile, {label}, 50 calls, cumulative", flush=True)
        pstats.Stats(pr, stream=sys.stdout).sort_stats("cumulative").print_stats(45)
        print(f"\n===== cProfile, {label}, 50 calls, own time", flush=True)
        pstats.Stats(pr, stream=sys.stdout).sort_stats("tottime").print_stats(30)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        print(f"\n===== torch profiler, {label}, 10 calls", flush=True)
        print(prof.key_averages().table(sort_by="count", row_limit=45, max_name_column_width=60))
    buf.destroy()
    dist.destroy_process_group()
    return 0


def _kernel_launches(per_call, srcw: torch.Tensor, dst: torch.Tensor, T: int) -> None:
    """Host cost of a Triton launch by its number of arguments: the nvlink path's copy-out and scatter
    kernels, where this version of deep_ep has them with these signatures (else said and skipped)."""
    try:
        from deep_ep.kernels import scatter

        bounds = torch.tensor([T, 0, 0], device="cuda")
        slot = torch.zeros((T, 1), dtype=torch.int64, device="cuda")
        delta = torch.zeros(1, dtype=torch.int64, device="cuda")
        launches = (
            ("triton copy_out (3 tensor args, 2 ints, 3 constexpr)", lambda: scatter.copy_out(srcw, dst, bounds, 24)),
            (
                "triton scatter_rows (5 tensors, 4 ints, 5 constexpr)",
                lambda: scatter.scatter_rows(srcw, slot, dst, dst, delta, 0, 24),
            ),
        )
        for _, fn in launches:
            fn()
    except Exception as exc:  # a restructured kernel module: the rest of the tool still runs
        print(f"{'triton launches':58s} skipped ({type(exc).__name__}: {exc})".splitlines()[0], flush=True)
        return
    for label, fn in launches:
        per_call(label, fn)
