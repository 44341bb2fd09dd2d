"""``ll-probe``: where the time of a low-latency call goes on one GPU (one rank).

A host profile (time per call, cProfile) of eager ``low_latency_dispatch`` / ``low_latency_combine``
calls and the kernels' GPU times (torch profiler), at DeepSeek-V3's decoding shape by default (128
tokens, hidden 7168, top-8 of 256 experts).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from deep_ep.bench.launch import init_single_rank
from deep_ep.bench.timing import gpu_kernels, host_profile


def main(argv, prog: str = "deep-ep tools ll-probe") -> int:
    """Run the tool.

    Args:
        argv: its arguments (``--help`` lists them).
        prog: its name in usage lines.

    Returns:
        The exit status.
    """
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].split(": ", 1)[-1])
    p.add_argument("tokens", type=int, nargs="?", default=128, help="tokens per call (default 128)")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128, help="num_max_dispatch_tokens_per_rank (default 128)")
    p.add_argument("--backend", default="nvlink")
    a = p.parse_args(argv)
    init_single_rank("cuda")
    import deep_ep

    T, H, E, K, M = a.tokens, a.hidden, a.experts, a.topk, max(a.max_tokens, a.tokens)
    buf = deep_ep.Buffer(dist.group.WORLD, 64 << 20, backend=a.backend)
    x = torch.randn((T, H), device="cuda").to(torch.bfloat16)
    idx = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)])
    w = torch.rand((T, K), device="cuda")
    y = torch.randn((E, M, H), device="cuda").to(torch.bfloat16)
    for _ in range(5):
        h = buf.low_latency_dispatch(x, idx, M, E)[2]
        buf.low_latency_combine(y, idx, w, h)
    torch.cuda.synchronize()
    host_profile("dispatch", lambda: buf.low_latency_dispatch(x, idx, M, E))
    h_keep = buf.low_latency_dispatch(x, idx, M, E)[2]
    host_profile("combine", lambda: buf.low_latency_combine(y, idx, w, h_keep))

    def both():
        h = buf.low_latency_dispatch(x, idx, M, E)[2]
        buf.low_latency_combine(y, idx, w, h)

    _, table = gpu_kernels(both, iters=20, rows=12, sort="cuda_time_total")
    print(table)
    buf.destroy()
    dist.destroy_process_group()
    return 0
