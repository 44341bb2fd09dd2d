"""``moe-profile``: where the time of an ExpertParallelMoE training step goes on one GPU (one rank).

Forward and backward with 1 and ``--chunks`` chunks: host time per step, the layer's stats, a cProfile
of one step and torch profiler's top CPU and CUDA ops (with ``--trace-dir``, also a Chrome trace per
chunk count).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

import torch
import torch.distributed as dist

from deep_ep.bench.launch import init_single_rank


def main(argv, prog: str = "deep-ep tools moe-profile") -> int:
    """Run the tool.

    Args:
        argv: its arguments (``--help`` lists them).
        prog: its name in usage lines.

    Returns:
        The exit status.
    """
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].split(": ", 1)[-1])
    p.add_argument("--backend", default="nvlink")
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=6, help="timed steps per chunk count (default 6)")
    p.add_argument("--rows", type=int, default=22, help="rows of each profile table (default 22)")
    p.add_argument("--trace-dir", metavar="DIR", help="write moe_trace_chunks<N>.json (Chrome traces) here")
    a = p.parse_args(argv)
    init_single_rank("cuda")
    from torch.profiler import ProfilerActivity, profile

    import deep_ep

    buf = deep_ep.Buffer(dist.group.WORLD, backend=a.backend)
    x = torch.randn((a.tokens, a.hidden), device="cuda", dtype=torch.bfloat16)
    go = torch.randn_like(x)
    for chunks in (1, a.chunks):
        layer = deep_ep.ExpertParallelMoE(
            a.hidden,
            a.ffn,
            a.experts,
            a.topk,
            num_chunks=chunks,
            buffer=buf,
            record_stats=True,
            dtype=torch.bfloat16,
            device="cuda",
        )
        xi = x.clone().requires_grad_()

        def step(layer=layer, xi=xi):
            layer(xi).backward(go)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fw = bw = 0.0
        for _ in range(a.steps):
            s0 = time.perf_counter()
            y = layer(xi)
            torch.cuda.synchronize()
            s1 = time.perf_counter()
            y.backward(go)
            torch.cuda.synchronize()
            fw += s1 - s0
            bw += time.perf_counter() - s1
        t = (time.perf_counter() - t0) / a.steps
        print(
            f"=== chunks={chunks}: step {t * 1e3:.2f} ms (forward {fw / a.steps * 1e3:.2f}, backward "
            f"{bw / a.steps * 1e3:.2f}); stats {layer.stats}",
            flush=True,
        )
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
            step()
            torch.cuda.synchronize()
        pr = cProfile.Profile()
        pr.enable()
        step()
        torch.cuda.synchronize()
        pr.disable()
        print(f"--- cProfile of one step, chunks={chunks}")
        pstats.Stats(pr).sort_stats("tottime").print_stats(a.rows)
        pstats.Stats(pr).sort_stats("cumulative").print_stats(a.rows + 10)
        if a.trace_dir:
            os.makedirs(a.trace_dir, exist_ok=True)
            prof.export_chrome_trace(os.path.join(a.trace_dir, f"moe_trace_chunks{chunks}.json"))
        ka = prof.key_averages()
        print(ka.table(sort_by="self_cpu_time_total", row_limit=a.rows))
        print(ka.table(sort_by="self_cuda_time_total", row_limit=a.rows))
    buf.destroy()
    dist.destroy_process_group()
    return 0
