"""Host (Python) time of the nvlink device path on one GPU: a fresh dispatch with ``num_worst_tokens``
(nothing read on the host), its combine, and for comparison a fresh dispatch that reads its counts.

    python scripts/host_device_path.py [tokens] [hidden]

Prints host microseconds per call (the GPU kept busy: one synchronize at the end of each batch) and the
cProfile of each kind of call sorted by own time.
"""
import os
import sys

import torch
import torch.distributed as dist

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29547")
torch.cuda.set_device(0)
dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
import deep_ep  # noqa: E402
from _timing import host_profile  # noqa: E402  (scripts/ is on sys.path when run as a script)

T = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
H = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
E, K = 64, 8
buf = deep_ep.Buffer(dist.group.WORLD, backend="nvlink")
x = torch.randn((T, H), device="cuda").to(torch.bfloat16)
idx = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)])
w = torch.rand((T, K), device="cuda")


def fresh(worst):
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    return buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                        topk_idx=idx, topk_weights=w, num_worst_tokens=worst, async_finish=True)


rx, _, _, _, handle, _ = fresh(T)


def combine():
    return buf.combine(rx, handle, async_finish=True)


def measure(label, fn, n=100):
    host_profile(label, fn, n, rows=28)


measure("fresh dispatch, num_worst_tokens (device path)", lambda: fresh(T))
measure("combine of a device-path handle", combine)
measure("fresh dispatch, counts read on the host", lambda: fresh(0), n=50)
buf.destroy()
dist.destroy_process_group()
