"""Where the time of an ExpertParallelMoE step goes on one GPU (one rank): forward and backward with 1 and
N chunks, host time per step, and torch.profiler's top CPU and CUDA ops.

    python scripts/profile_moe.py [--backend nvlink] [--chunks 4] [--hidden 2048] [--ffn 1024] [--experts 64]
                                  [--topk 8] [--tokens 4096] [--steps 6]
"""

import argparse
import os
import time

import torch
import torch.distributed as dist

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29541")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="nvlink")
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rows", type=int, default=22)
    a = p.parse_args()
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
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

        def step():
            y = layer(xi)
            y.backward(go)

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
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        step()
        torch.cuda.synchronize()
        pr.disable()
        print(f"--- cProfile of one step, chunks={chunks}")
        pstats.Stats(pr).sort_stats("tottime").print_stats(a.rows)
        pstats.Stats(pr).sort_stats("cumulative").print_stats(a.rows + 10)
        if os.environ.get("OUT"):
            prof.export_chrome_trace(os.path.join(os.environ["OUT"], f"moe_trace_chunks{chunks}.json"))
        ka = prof.key_averages()
        print(ka.table(sort_by="self_cpu_time_total", row_limit=a.rows))
        print(ka.table(sort_by="self_cuda_time_total", row_limit=a.rows))
    buf.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
