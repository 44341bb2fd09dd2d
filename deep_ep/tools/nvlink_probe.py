"""``nvlink-probe``: the pieces of an nvlink dispatch on raw torch symmetric memory, on 2 GPUs.

At the normal workload's volume (4096 rows of 7168 bf16 = 58.7 MB to the peer), both ranks at once, rank 0
prints the median of ``--iters`` CUDA-event timings (a barrier before each) and the GB/s of: a gathered
``index_select`` straight into the peer's buffer, a contiguous ``copy_`` into the peer (the link
limit), a local ``index_select``, the local copy-out, and the symmetric-memory barrier. Wrote
``benchmarks/results/2026-11-28-nvidia-h200-nvlink-probe.json``.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from deep_ep.bench.launch import init_rank, launch
from deep_ep.bench.timing import CudaTimer, median


def _rank(rank: int, a, port: int, _path) -> None:
    device = init_rank(rank, 2, "cuda", port)
    import torch.distributed._symmetric_memory as symm_mem

    ctrl = dist.new_group(backend="gloo")
    T, H = a.tokens, a.hidden
    nbytes = max(512 << 20, 2 * T * H * 2)
    buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
    hdl = symm_mem.rendezvous(buf, dist.group.WORLD)
    pbuf = hdl.get_buffer(1 - rank, (nbytes,), torch.uint8, 0)
    x = torch.randn(T, H, device=device).to(torch.bfloat16)
    xw = x.view(torch.int64)  # [T, H / 4]
    W = xw.size(1)
    idx = torch.randperm(T, device=device).sort().values
    region = pbuf[: T * W * 8].view(torch.int64).view(T, W)
    local = buf[: T * W * 8].view(torch.int64).view(T, W)
    out = torch.empty_like(xw)
    timer = CudaTimer(device, flush_bytes=0, group=ctrl)
    pieces = {
        "index_select -> peer": lambda: torch.index_select(xw, 0, idx, out=region),
        "copy_ contiguous -> peer": lambda: region.copy_(xw),
        "index_select local": lambda: torch.index_select(xw, 0, idx, out=out),
        "copy_ local (copy-out)": lambda: out.copy_(local),
        "symm barrier": lambda: hdl.barrier(channel=0),
    }
    rows = [(name, median(timer(fn, a.iters, 3))) for name, fn in pieces.items()]
    if rank == 0:
        gb = T * H * 2 / 1e9
        print(f"{'piece':40s} {'us':>8s} {'GB/s':>8s}")
        for name, us in rows:
            print(f"{name:40s} {us:8.1f} {gb / (us / 1e6):8.1f}", flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(
                    dict(
                        card=torch.cuda.get_device_name(device),
                        torch=torch.__version__,
                        tokens=T,
                        hidden=H,
                        rows=[dict(piece=n, time_us=us, gbps=gb / (us / 1e6)) for n, us in rows],
                    ),
                    f,
                    indent=1,
                )
    dist.barrier(group=ctrl)
    dist.destroy_process_group()


def main(argv, prog: str = "deep-ep tools nvlink-probe") -> int:
    """Run the tool.

    Args:
        argv: its arguments (``--help`` lists them).
        prog: its name in usage lines.

    Returns:
        The exit status.
    """
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].split(": ", 1)[-1])
    p.add_argument("--tokens", type=int, default=4096, help="rows sent to the peer (default 4096)")
    p.add_argument("--hidden", type=int, default=7168, help="bf16 values per row (default 7168)")
    p.add_argument("--iters", type=int, default=20, help="timed runs, median reported (default 20)")
    p.add_argument("--json", metavar="FILE", help="write the rows here")
    a = p.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        p.error("needs 2 CUDA GPUs")
    launch(_rank, (a,), None, 2, "cuda")
    return 0
