"""Where the time of the nvlink Buffer goes on 2 GPUs (device investigation, not a benchmark of record).

python scripts/profile_nvlink.py OUT_DIR -> rank 0 prints, for cached dispatch (bf16, fp8), combine and fresh
dispatch at the normal workload, with staging sized as the bench does (DeepEP's hint) and at 256 MiB:
CUDA-event time (L2 flushed first, as the bench), host time per call, GPU kernel time per call, and the
top host functions of a fresh dispatch (cProfile). Writes the profiler tables under OUT_DIR.
"""

import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def event_time(fn, iters=20):
    scratch = torch.empty(64 << 20, dtype=torch.int32, device="cuda")
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    ts = []
    for _ in range(iters):
        scratch.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        ts.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) * 1000 for a, b in ts)


def host_time(fn, iters=20):
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - t0) / iters * 1e6
    torch.cuda.synchronize()
    return host


def kernel_time(fn, iters=5):
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    dist.barrier()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    gpu = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in ka) / iters
    return gpu, ka.table(sort_by="self_cuda_time_total", row_limit=12)


def worker(rank, world, out_dir):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29637")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    import deep_ep

    T, H, E, K = 4096, 7168, 256, 8
    g = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(T, H, device="cuda", generator=g).to(torch.bfloat16)
    x8 = (x.float().clamp(-400, 400).to(torch.float8_e4m3fn), torch.rand(T, H // 128, device="cuda"))
    topk_idx = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=1).indices.to(deep_ep.topk_idx_t)
    topk_w = torch.rand(T, K, device="cuda", generator=g)
    deep_ep.Buffer.set_num_sms(24)
    hint = deep_ep.Buffer.get_dispatch_config(world).get_nvl_buffer_size_hint(2 * H, world)
    lines, tables = [], []
    # Host cost of single operations (does any of them block the host?).
    probe = deep_ep.Buffer(dist.group.WORLD, 256 << 20, backend="nvlink")
    tr = probe._transport
    peer = 1 - rank
    rows = 4096 * 1792
    mine = tr.peers[rank][tr.halves[0] : tr.halves[0] + rows * 8].view(torch.int64)
    theirs = tr.peers[peer][tr.halves[0] : tr.halves[0] + rows * 8].view(torch.int64)
    local = torch.empty(rows, dtype=torch.int64, device="cuda")
    idx = torch.arange(4096, device="cuda")
    ops = {
        "symm barrier": lambda: tr._barrier(),
        "pull copy_ 58 MB": lambda: local.copy_(theirs),
        "push copy_ 58 MB": lambda: theirs.copy_(local),
        "local copy_ 58 MB": lambda: local.copy_(mine),
        "index_select local": lambda: torch.index_select(local.view(4096, 1792), 0, idx, out=mine.view(4096, 1792)),
    }
    for name, fn in ops.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        lines.append(
            f"host cost of {name:22s}: {(t1 - t0) / 10 * 1e6:8.1f} us/launch, "
            f"{(t2 - t0) / 10 * 1e6:8.1f} us/op incl. GPU"
        )
    probe.destroy()
    dist.barrier()
    for nbytes in (hint, 256 << 20):
        buf = deep_ep.Buffer(dist.group.WORLD, nbytes, backend="nvlink")

        def fresh(inp=x):
            a, b, c, d, _ = buf.get_dispatch_layout(topk_idx, E)
            return buf.dispatch(
                inp,
                num_tokens_per_rank=a,
                num_tokens_per_rdma_rank=b,
                is_token_in_rank=d,
                num_tokens_per_expert=c,
                topk_idx=topk_idx,
                topk_weights=topk_w,
            )

        out = fresh()
        recv_x, handle = out[0], out[4]
        handle8 = fresh(x8)[4]
        cases = {
            "cached bf16": lambda: buf.dispatch(x, handle=handle),
            "cached fp8": lambda: buf.dispatch(x8, handle=handle8),
            "combine": lambda: buf.combine(recv_x, handle),
            "fresh bf16": fresh,
        }
        for name, fn in cases.items():
            ev = event_time(fn)
            host = host_time(fn)
            gpu, tab = kernel_time(fn)
            lines.append(
                f"staging {nbytes / 2**20:6.1f} MiB {name:12s} event {ev:8.1f} us  host {host:8.1f} us  "
                f"gpu kernels {gpu:8.1f} us"
            )
            tables.append(f"=== staging {nbytes / 2**20:.1f} MiB, {name}\n{tab}")
        for name in ("cached bf16", "combine", "fresh bf16"):
            prof = cProfile.Profile()
            torch.cuda.synchronize()
            dist.barrier()
            prof.enable()
            for _ in range(10):
                cases[name]()
            prof.disable()
            torch.cuda.synchronize()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
            tables.append(f"=== cProfile (tottime), 10 x {name}, staging {nbytes / 2**20:.1f} MiB\n{s.getvalue()}")
        buf.destroy()
        dist.barrier()
    if rank == 0:
        print("\n".join(lines))
        with open(os.path.join(out_dir, "profile_nvlink.txt"), "w") as f:
            f.write("\n".join(lines) + "\n\n" + "\n".join(tables))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    os.makedirs(out, exist_ok=True)
    mp.spawn(worker, args=(2, out), nprocs=2)
