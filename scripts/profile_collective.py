"""Profile one rank of a 2-GPU collective dispatch/combine (device investigation helper).

python scripts/profile_collective.py [tokens] [hidden]   -> prints torch.profiler tables for rank 0
"""
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, world, T, H):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29611")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    import deep_ep
    buf = deep_ep.Buffer(dist.group.WORLD, backend="collective")
    E, K = 256, 8
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    idx = torch.rand(T, E, device="cuda").topk(K, dim=1).indices
    w = torch.rand(T, K, device="cuda")

    def fresh():
        a, _, c, d, _ = buf.get_dispatch_layout(idx, E)
        return buf.dispatch(x, num_tokens_per_rank=a, is_token_in_rank=d, num_tokens_per_expert=c, topk_idx=idx,
                            topk_weights=w)

    for _ in range(3):
        rx, ri, rw, lst, h, _ = fresh()
        out = buf.combine(rx, h)[0]
    torch.cuda.synchronize()
    dist.barrier()
    for name, fn in (("fresh", fresh), ("cached", lambda: buf.dispatch(x, handle=h)),
                     ("combine", lambda: buf.combine(rx, h))):
        ts = []
        for _ in range(10):
            torch.cuda.synchronize(); dist.barrier()
            t0 = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t0)
        if rank == 0:
            print(f"{name}: wall median {sorted(ts)[5]*1e6:.0f} us", flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn(); torch.cuda.synchronize()
        if rank == 0:
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14), flush=True)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    T = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    H = int(sys.argv[2]) if len(sys.argv) > 2 else 7168
    mp.spawn(worker, args=(2, T, H), nprocs=2)
