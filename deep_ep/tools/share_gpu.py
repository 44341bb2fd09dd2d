"""``share-gpu``: can N processes share one GPU for the multi-rank tests? (gloo on CUDA tensors and
torch symmetric memory between processes of one GPU.)

Each check prints ``ok`` or ``FAIL`` with its error; the exit status is the number of failures. This is
how ``DEEP_EP_TEST_SHARE_GPU=N pytest -m gpu`` (tests/conftest.py) runs the multi-rank GPU tests on a
machine with fewer GPUs than ranks.
"""

from __future__ import annotations

import argparse
import datetime
import os
import traceback

import torch
import torch.distributed as dist

from deep_ep.bench.launch import launch


def _check(rank: int, name: str, fn, fails: list, trace: bool) -> None:
    try:
        fn()
        if rank == 0:
            print(f"ok    {name}", flush=True)
    except Exception as e:  # a probe reports everything
        fails.append(name)
        print(f"FAIL  {name} (rank {rank}): {type(e).__name__}: {str(e)[:300]}", flush=True)
        if trace:
            traceback.print_exc()


def _rank(rank: int, world: int, trace: bool, port: int, path: str) -> None:
    torch.cuda.set_device(rank % torch.cuda.device_count())
    dev = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(
        "cpu:gloo,cuda:gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    fails: list = []

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
        y = torch.empty((rank + 1) * world, 4, device=dev)
        dist.all_to_all_single(y, x, [rank + 1] * world, ins)
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
        assert int(mine[3].item()) == 200 + (rank - 1) % world, int(mine[3].item())

    for name, fn in [
        ("gloo all_reduce cuda", all_reduce),
        ("gloo all_gather_into_tensor cuda", all_gather_into_tensor),
        ("gloo all_to_all_single cuda uneven", all_to_all_uneven),
        ("broadcast_object_list", broadcast_object),
        ("symmetric memory rendezvous/peer store/barrier", symm_mem),
    ]:
        _check(rank, name, fn, fails, trace)
    counts = [None] * world
    dist.all_gather_object(counts, len(fails))
    if rank == 0:
        with open(path, "w") as f:
            f.write(str(sum(counts)))
    dist.destroy_process_group()


def main(argv, prog: str = "deep-ep tools share-gpu") -> int:
    """Run the tool.

    Args:
        argv: its arguments (``--help`` lists them).
        prog: its name in usage lines.

    Returns:
        The number of failed checks (summed over ranks).
    """
    import tempfile

    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].split(": ", 1)[-1])
    p.add_argument("world", type=int, nargs="?", default=2, help="processes (default 2)")
    p.add_argument("--trace", action="store_true", help="print the traceback of each failure")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    os.environ.setdefault("TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES", "1")  # else rendezvous refuses a shared GPU
    with tempfile.TemporaryDirectory(prefix="deep_ep_share_") as tmp:
        path = os.path.join(tmp, "fails")
        launch(_rank, (a.world, a.trace), path, a.world, "cuda")
        with open(path) as f:
            return int(f.read())
