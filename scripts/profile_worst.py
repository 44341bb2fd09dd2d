"""Where the time of a num_worst_tokens dispatch (the nvlink device path) goes on 2 GPUs (investigation).

python scripts/profile_worst.py OUT_DIR -> rank 0 prints CUDA-event, host and GPU-kernel time of the layout,
the dispatch and both, the kernel table and the top host functions; writes them to OUT_DIR/profile_worst.txt.
"""

import cProfile
import io
import os
import pstats
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_nvlink import event_time, host_time  # noqa: E402


def kernel_table(fn, iters=5, rows=30):
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    dist.barrier()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    gpu = sum(getattr(e, "self_device_time_total", 0) for e in ka) / iters
    return gpu, ka.table(sort_by="self_cuda_time_total", row_limit=rows)


def worker(rank, world, out_dir):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29639")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    import deep_ep

    T, H, E, K = 4096, 7168, 256, 8
    g = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(T, H, device="cuda", generator=g).to(torch.bfloat16)
    topk_idx = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=1).indices.to(deep_ep.topk_idx_t)
    topk_w = torch.rand(T, K, device="cuda", generator=g)
    deep_ep.Buffer.set_num_sms(24)
    buf = deep_ep.Buffer(dist.group.WORLD, 320 << 20, backend="nvlink")
    worst = world * T
    lay = buf.get_dispatch_layout(topk_idx, E)

    def layout_only():
        return buf.get_dispatch_layout(topk_idx, E)

    def dispatch_only():
        a, b, c, d, _ = lay
        return buf.dispatch(
            x,
            num_tokens_per_rank=a,
            num_tokens_per_rdma_rank=b,
            is_token_in_rank=d,
            num_tokens_per_expert=c,
            topk_idx=topk_idx,
            topk_weights=topk_w,
            num_worst_tokens=worst,
        )

    def x_only():
        a, b, c, d, _ = lay
        return buf.dispatch(x, is_token_in_rank=d, num_worst_tokens=worst)

    def both():
        layout_only()
        return dispatch_only()

    h = dispatch_only()[4]
    cases = {
        "layout": layout_only,
        "dispatch": dispatch_only,
        "dispatch x only": x_only,
        "both": both,
        "cached": lambda: buf.dispatch(x, handle=h),
        "combine": lambda: buf.combine(dispatch_only()[0], h),
    }
    lines, tables = [], []
    for name, fn in cases.items():
        ev = event_time(fn)
        host = host_time(fn)
        gpu, tab = kernel_table(fn)
        lines.append(f"{name:16s} event {ev:8.1f} us  host {host:8.1f} us  gpu kernels {gpu:8.1f} us")
        if name in ("dispatch", "cached"):
            tables.append(f"=== {name}\n{tab}")
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    dist.barrier()
    prof.enable()
    for _ in range(10):
        dispatch_only()
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    tables.append(f"=== cProfile (tottime), 10 x dispatch\n{s.getvalue()}")
    if rank == 0:
        print("\n".join(lines))
        with open(os.path.join(out_dir, "profile_worst.txt"), "w") as f:
            f.write("\n".join(lines) + "\n\n" + "\n".join(tables))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    os.makedirs(out, exist_ok=True)
    mp.spawn(worker, args=(2, out), nprocs=2)
