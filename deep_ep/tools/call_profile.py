"""``call-profile``: where the time of each Buffer call goes, on every local GPU (one rank each).

At the normal workload (4096 tokens per rank, hidden 7168, top-8 of 256 experts, ``--num-sms`` 24), for
each call (``layout``; ``fresh``: layout exchange read on the host; ``worst``: a from-scratch
``num_worst_tokens`` dispatch, the nvlink device path; ``layout+worst``; ``cached`` bf16 and fp8;
``combine``) rank 0 prints its CUDA-event time (L2 flushed, as the benchmark), its host time per call
and the sum of its GPU kernels, then the kernel tables and cProfiles of the calls named by ``--detail``;
``--out DIR`` writes them to ``DIR/call_profile.txt``. Replaces the investigations that wrote
``benchmarks/results/2026-12-01-nvidia-h200-profile-worst.txt`` and ``...-profile-nvlink.txt``.
"""

from __future__ import annotations

import argparse
import io
import os
import pstats

import torch
import torch.distributed as dist

from deep_ep.bench.launch import init_rank, launch
from deep_ep.bench.timing import CudaTimer, gpu_kernels, host_us, median, profile_calls

CALLS = ("layout", "fresh", "worst", "layout+worst", "cached", "cached-fp8", "combine")


def _rank(rank: int, a, port: int, _path) -> None:
    world = a.world_size
    device = init_rank(rank, world, "cuda", port)
    import deep_ep

    T, H, E, K = a.tokens, a.hidden, a.experts, a.topk
    g = torch.Generator(device=device).manual_seed(rank)
    x = torch.randn(T, H, device=device, generator=g).to(torch.bfloat16)
    x8 = (x.float().clamp(-400, 400).to(torch.float8_e4m3fn), torch.rand(T, H // 128, device=device))
    topk_idx = torch.rand(T, E, device=device, generator=g).topk(K, dim=1).indices.to(deep_ep.topk_idx_t)
    topk_w = torch.rand(T, K, device=device, generator=g)
    deep_ep.Buffer.set_num_sms(a.num_sms)
    worst = world * T
    buf = deep_ep.Buffer(dist.group.WORLD, a.staging << 20, backend=a.backend)
    lay = buf.get_dispatch_layout(topk_idx, E)

    def dispatch(inp=x, num_worst_tokens=0, layout=None):
        ntpr, ntpr_rdma, ntpe, in_rank, _ = layout or lay
        return buf.dispatch(
            inp,
            num_tokens_per_rank=ntpr,
            num_tokens_per_rdma_rank=ntpr_rdma,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=ntpe,
            topk_idx=topk_idx,
            topk_weights=topk_w,
            num_worst_tokens=num_worst_tokens,
        )

    out = dispatch()
    recv_x, handle = out[0], out[4]
    handle8 = dispatch(x8)[4]
    calls = {
        "layout": lambda: buf.get_dispatch_layout(topk_idx, E),
        "fresh": lambda: dispatch(layout=buf.get_dispatch_layout(topk_idx, E)),
        "worst": lambda: dispatch(num_worst_tokens=worst),
        "layout+worst": lambda: dispatch(num_worst_tokens=worst, layout=buf.get_dispatch_layout(topk_idx, E)),
        "cached": lambda: buf.dispatch(x, handle=handle),
        "cached-fp8": lambda: buf.dispatch(x8, handle=handle8),
        "combine": lambda: buf.combine(recv_x, handle),
    }
    timer = CudaTimer(device, 256 << 20)
    lines, tables = [], []
    for name in a.calls:
        fn = calls[name]
        dist.barrier()
        event = median(timer(fn, a.iters, 3))
        dist.barrier()
        host = host_us(fn, n=a.iters, batches=min(5, a.iters))
        dist.barrier()
        gpu, table = gpu_kernels(fn, iters=5, rows=30)
        lines.append(f"{name:14s} event {event:8.1f} us  host {host:8.1f} us  gpu kernels {gpu:8.1f} us")
        if name in a.detail:
            tables.append(f"=== kernels of {name} (rank {rank})\n{table}")
    for name in a.detail:
        dist.barrier()
        s = io.StringIO()
        pstats.Stats(profile_calls(calls[name], 10), stream=s).sort_stats("tottime").print_stats(30)
        tables.append(f"=== cProfile (tottime), 10 x {name}\n{s.getvalue()}")
    if rank == 0:
        head = (
            f"{world} x {torch.cuda.get_device_name(device)}, backend {buf.backend}, {T} tokens, hidden {H}, "
            f"top-{K} of {E}, {a.num_sms} SMs, staging {a.staging} MiB, num_worst_tokens {worst}"
        )
        print(head + "\n" + "\n".join(lines), flush=True)
        if a.out:
            os.makedirs(a.out, exist_ok=True)
            with open(os.path.join(a.out, "call_profile.txt"), "w") as f:
                f.write(head + "\n" + "\n".join(lines) + "\n\n" + "\n".join(tables))
            print(f"wrote {os.path.join(a.out, 'call_profile.txt')}", flush=True)
    buf.destroy()
    dist.barrier()
    dist.destroy_process_group()


def main(argv, prog: str = "deep-ep tools call-profile") -> int:
    """Run the tool.

    Args:
        argv: its arguments (``--help`` lists them).
        prog: its name in usage lines.

    Returns:
        The exit status.
    """
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].split(": ", 1)[-1])
    p.add_argument("--world-size", type=int, help="ranks, one GPU each (default: every local GPU)")
    p.add_argument("--backend", default="nvlink")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--num-sms", type=int, default=24)
    p.add_argument("--staging", type=int, default=320, help="num_nvl_bytes in MiB (default 320: holds worst)")
    p.add_argument("--iters", type=int, default=20, help="timed calls per figure (default 20)")
    p.add_argument("--calls", default=",".join(CALLS), help=f"comma list of {', '.join(CALLS)}")
    p.add_argument("--detail", default="worst,cached", help="calls whose kernel table and cProfile are shown")
    p.add_argument("--out", metavar="DIR", help="write call_profile.txt here")
    a = p.parse_args(argv)
    a.calls = [c for c in a.calls.split(",") if c]
    a.detail = [c for c in a.detail.split(",") if c]
    bad = [c for c in a.calls + a.detail if c not in CALLS]
    if bad:
        p.error(f"unknown call(s) {', '.join(bad)}; choose from {', '.join(CALLS)}")
    if not torch.cuda.is_available():
        p.error("needs CUDA GPUs")
    a.world_size = a.world_size or torch.cuda.device_count()
    launch(_rank, (a,), None, a.world_size, "cuda")
    return 0
