"""Can N processes share one GPU for the multi-rank tests? (gloo on CUDA tensors + symmetric memory)

    python scripts/share_gpu_probe.py [N]

Each check prints ok / FAIL with the error; the exit status is the number of failures on rank 0.
This is how ``DEEP_EP_TEST_SHARE_GPU=N`` (tests/conftest.py) runs the 2-rank GPU tests on a one-GPU machine.
"""

import datetime
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _check(rank, name, fn, fails):
    try:
        fn()
        if rank == 0:
            print(f"ok    {name}", flush=True)
    except Exception as e:  # noqa: BLE001 - a probe reports everything
        fails.append(name)
        print(f"FAIL  {name} (rank {rank}): {type(e).__name__}: {str(e)[:300]}", flush=True)
        if os.environ.get("PROBE_TRACE"):
            traceback.print_exc()


def worker(rank, world, port, q):
    torch.cuda.set_device(rank % torch.cuda.device_count())
    dev = torch.device("cuda", torch.cuda.current_device())
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group(
        "cpu:gloo,cuda:gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    fails = []

    def all_reduce():
        t = torch.full((5,), rank + 1.0, device=dev)
        dist.all_reduce(t)
        assert t[0].item() == world * (world + 1) / 2

    def all_gather_into_tensor():
        out = torch.empty(world * 3, device=dev)
        dist.all_gather_into_tensor(out, torch.full((3,), float(rank), device=dev))
        assert out.view(world, 3)[:, 0].tolist() == list(range(world))

    def all_to_all_uneven():
        ins = [r + 1 for r in range(world)]  # to rank r: r + 1 rows
        x = torch.full((sum(ins), 4), float(rank), device=dev)
        outs = [rank + 1] * world
        y = torch.empty(sum(outs), 4, device=dev)
        dist.all_to_all_single(y, x, outs, ins)
        assert y[:, 0].tolist() == [float(r) for r in range(world) for _ in range(rank + 1)]

    def broadcast_object():
        obj = [rank]
        dist.broadcast_object_list(obj, src=0)
        assert obj[0] == 0

    def symm_mem():
        import torch.distributed._symmetric_memory as sm

        buf = sm.empty(1 << 20, dtype=torch.uint8, device=dev)
        hdl = sm.rendezvous(buf, dist.group.WORLD)
        buf.fill_(rank + 1)
        hdl.barrier(channel=0)
        peer = (rank + 1) % world
        view = hdl.get_buffer(peer, (1 << 20,), torch.uint8, 0)
        assert int(view[123].item()) == peer + 1
        mine = hdl.get_buffer(rank, (16,), torch.uint8, 0)
        view[:16].copy_(torch.full((16,), 200 + rank, dtype=torch.uint8, device=dev))  # store into the peer
        torch.cuda.synchronize()
        hdl.barrier(channel=0)
        src = (rank - 1) % world
        assert int(mine[3].item()) == 200 + src, int(mine[3].item())

    for name, fn in [
        ("gloo all_reduce cuda", all_reduce),
        ("gloo all_gather_into_tensor cuda", all_gather_into_tensor),
        ("gloo all_to_all_single cuda uneven", all_to_all_uneven),
        ("broadcast_object_list", broadcast_object),
        ("symmetric memory rendezvous/peer store/barrier", symm_mem),
    ]:
        _check(rank, name, fn, fails)
    if rank == 0:
        q.put(len(fails))
    dist.destroy_process_group()


def main():
    world = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES", "1")  # else rendezvous refuses a shared GPU
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    import random

    port = random.randint(20000, 40000)
    procs = [ctx.Process(target=worker, args=(r, world, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    for p in procs:
        if p.is_alive():
            p.kill()
            print("FAIL  a rank hung", flush=True)
            return 99
    return q.get() if not q.empty() else 98


if __name__ == "__main__":
    sys.exit(main())
