"""Probe the pieces of the nvlink transport on 2 GPUs (device investigation, not a benchmark of record).

python scripts/nvlink_probe.py  -> rank 0 prints the median time (us) and GB/s of each piece for the
normal-workload volume (4096 rows of 7168 bf16 to the peer), both ranks sending at once.
"""

import os
import statistics

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def timed(fn, iters=20):
    ts = []
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    for _ in range(iters):
        dist.barrier()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1000)
    return statistics.median(ts)


def worker(rank, world):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29633")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    import torch.distributed._symmetric_memory as symm_mem

    T, H = 4096, 7168
    nbytes = 512 << 20
    buf = symm_mem.empty(nbytes, dtype=torch.uint8, device="cuda")
    hdl = symm_mem.rendezvous(buf, dist.group.WORLD)
    peer = 1 - rank
    pbuf = hdl.get_buffer(peer, (nbytes,), torch.uint8, 0)
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    xw = x.view(torch.int64)  # [T, 1792]
    W = xw.size(1)
    idx = torch.randperm(T, device="cuda").sort().values
    region = pbuf[: T * W * 8].view(torch.int64).view(T, W)
    local = buf[: T * W * 8].view(torch.int64).view(T, W)
    out = torch.empty_like(xw)
    gb = T * H * 2 / 1e9
    rows = []
    rows.append(("index_select -> peer", timed(lambda: torch.index_select(xw, 0, idx, out=region))))
    rows.append(("copy_ contiguous -> peer", timed(lambda: region.copy_(xw))))
    rows.append(("index_select local", timed(lambda: torch.index_select(xw, 0, idx, out=out))))
    rows.append(("copy_ local (copy-out)", timed(lambda: out.copy_(local))))
    rows.append(("symm barrier", timed(lambda: hdl.barrier(channel=0))))
    if rank == 0:
        print(f"{'piece':40s} {'us':>8s} {'GB/s':>8s}")
        for name, us in rows:
            print(f"{name:40s} {us:8.1f} {gb / (us / 1e6):8.1f}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(2,), nprocs=2)
