"""Probe pipelined designs for the nvlink dispatch/combine on 2 GPUs (device investigation).

python scripts/nvlink_pipeline_probe.py [out.json] -> rank 0 prints the median CUDA-event time (us) of each
variant at the normal-workload volume (4096 rows of 7168 bf16 to the peer, both ranks at once):

- push / pull, serial (barrier between the halves) and chunk-pipelined with symmetric-memory signals
  (``put_signal`` / ``wait_signal``) on two streams;
- the Buffer's own cached dispatch / combine on the nvlink backend: event time, host time per call,
  and the CUDA kernels of one call (torch.profiler).
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from nvlink_probe import timed  # same folder: the shared CUDA-event timing of the probes


def worker(rank, world, out_path):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29634")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    import torch.distributed._symmetric_memory as symm_mem

    info = {"torch": torch.__version__}
    T, H = 4096, 7168
    nbytes = 512 << 20
    buf = symm_mem.empty(nbytes, dtype=torch.uint8, device="cuda")
    hdl = symm_mem.rendezvous(buf, dist.group.WORLD)
    info["has_put_signal"] = hasattr(hdl, "put_signal")
    info["signal_pad_size"] = getattr(hdl, "signal_pad_size", None)
    peer = 1 - rank
    pbuf = hdl.get_buffer(peer, (nbytes,), torch.uint8, 0)
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    xw = x.view(torch.int64)
    W = xw.size(1)
    idx = torch.randperm(T, device="cuda").sort().values  # rows that go to the peer (all, shuffled order)
    half = T * W * 8
    mine = buf[:half].view(torch.int64).view(T, W)  # my staging
    theirs = pbuf[:half].view(torch.int64).view(T, W)  # peer's staging
    recv = torch.empty((2 * T, W), dtype=torch.int64, device="cuda")
    lo_rows = recv[rank * T : (rank + 1) * T] if rank == 0 else recv[T:]
    remote_rows = recv[peer * T : (peer + 1) * T]
    s_a, s_b = torch.cuda.Stream(), torch.cuda.Stream()
    rows = []

    def push_serial():
        torch.index_select(xw, 0, idx, out=lo_rows)
        torch.index_select(xw, 0, idx, out=theirs)
        hdl.barrier(channel=0)
        remote_rows.copy_(mine)

    def pull_serial():
        torch.index_select(xw, 0, idx, out=mine)
        torch.index_select(xw, 0, idx, out=lo_rows)
        hdl.barrier(channel=0)
        remote_rows.copy_(theirs)

    def pipelined(C, pull, local_on_b=True):
        bounds = [T * c // C for c in range(C + 1)]
        main = torch.cuda.current_stream()
        s_a.wait_stream(main)
        s_b.wait_stream(main)
        with torch.cuda.stream(s_a):
            for c in range(C):
                a, b = bounds[c], bounds[c + 1]
                torch.index_select(xw, 0, idx[a:b], out=(mine if pull else theirs)[a:b])
                hdl.put_signal(peer, channel=1 + c)
            if not local_on_b:
                torch.index_select(xw, 0, idx, out=lo_rows)
        with torch.cuda.stream(s_b):
            if local_on_b:
                torch.index_select(xw, 0, idx, out=lo_rows)
            for c in range(C):
                a, b = bounds[c], bounds[c + 1]
                hdl.wait_signal(peer, channel=1 + c)
                remote_rows[a:b].copy_((theirs if pull else mine)[a:b])
        main.wait_stream(s_a)
        main.wait_stream(s_b)

    def check(fn):
        recv.fill_(-1)
        mine.fill_(-7)
        torch.cuda.synchronize()
        dist.barrier()
        fn()
        torch.cuda.synchronize()
        dist.barrier()
        want = xw.index_select(0, idx)
        # the peer's x is different: compare only my local rows and that every remote row was written
        ok_local = bool(torch.equal(lo_rows, want))
        ok_remote = bool((remote_rows != -1).any(dim=1).all())
        return ok_local and ok_remote

    rows.append(("push serial (local, remote, barrier, copy-out)", timed(push_serial), check(push_serial)))
    rows.append(("pull serial (pack, local, barrier, pull)", timed(pull_serial), check(pull_serial)))
    if info["has_put_signal"]:
        for C in (2, 4, 8):
            for pull in (False, True):
                name = f"{'pull' if pull else 'push'} pipelined C={C}"
                try:
                    rows.append((name, timed(lambda: pipelined(C, pull)), check(lambda: pipelined(C, pull))))
                except Exception as e:  # noqa: BLE001
                    rows.append((name + f" FAILED {type(e).__name__}: {e}"[:200], -1, False))
        rows.append(("push pipelined C=4 local on A", timed(lambda: pipelined(4, False, False)), True))
    rows.append(("copy_ contiguous -> peer", timed(lambda: theirs.copy_(xw)), True))
    rows.append(("copy_ contiguous <- peer (pull)", timed(lambda: xw.clone().copy_(theirs)), True))

    # The Buffer itself.
    import deep_ep

    buffer = deep_ep.Buffer(dist.group.WORLD, backend="nvlink")
    E, K = 256, 8
    scores = torch.rand(T, E, device="cuda")
    topk_idx = scores.topk(K, dim=1).indices.to(deep_ep.topk_idx_t)
    topk_w = torch.rand(T, K, device="cuda")
    lay = buffer.get_dispatch_layout(topk_idx, E)
    recv_x, r_idx, r_w, nlist, handle, _ = buffer.dispatch(
        x,
        num_tokens_per_rank=lay[0],
        num_tokens_per_rdma_rank=lay[1],
        is_token_in_rank=lay[3],
        num_tokens_per_expert=lay[2],
        topk_idx=topk_idx,
        topk_weights=topk_w,
    )
    cfg = deep_ep.Config(24)

    def cached():
        buffer.dispatch(x, handle=handle, config=cfg)

    def comb():
        buffer.combine(recv_x, handle, config=cfg)

    t_disp = timed(cached)
    t_comb = timed(comb)
    torch.cuda.synchronize()
    for fn, name in ((cached, "dispatch"), (comb, "combine")):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        host = (time.perf_counter() - t0) / 20 * 1e6
        torch.cuda.synchronize()
        rows.append(
            (f"Buffer nvlink cached {name}: host us/call {host:.0f}", t_disp if name == "dispatch" else t_comb, True)
        )
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for fn, name in ((cached, "dispatch"), (comb, "combine")):
        dist.barrier()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        tables[name] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    if rank == 0:
        print(json.dumps(info))
        print(f"{'variant':60s} {'us':>8s} {'ok':>4s}")
        for name, us, ok in rows:
            print(f"{name:60s} {us:8.1f} {str(ok):>4s}")
        for name, tab in tables.items():
            print(f"--- profile of 5 cached {name} calls (rank 0)")
            print(tab)
        if out_path:
            with open(out_path, "w") as f:
                json.dump({"info": info, "rows": rows, "profiles": tables}, f, indent=1)
    dist.barrier()
    buffer.destroy() if hasattr(buffer, "destroy") else None
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(2, sys.argv[1] if len(sys.argv) > 1 else ""), nprocs=2)
