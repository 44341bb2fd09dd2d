"""Where the time of a low-latency call goes on one GPU: host profile (cProfile) of eager calls and the
kernels' GPU times (torch.profiler). python scripts/ll_probe.py [tokens]"""

import os
import sys

import torch
import torch.distributed as dist

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29533")
torch.cuda.set_device(0)
dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
import deep_ep  # noqa: E402

T = int(sys.argv[1]) if len(sys.argv) > 1 else 128
H, E, K, M = 7168, 256, 8, 128
buf = deep_ep.Buffer(dist.group.WORLD, 64 << 20, backend="nvlink")
x = torch.randn((T, H), device="cuda").to(torch.bfloat16)
idx = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)])
w = torch.rand((T, K), device="cuda")
for _ in range(5):
    rx, cnt, h, _, _ = buf.low_latency_dispatch(x, idx, M, E)
    y = torch.randn((E, M, H), device="cuda").to(torch.bfloat16)
    buf.low_latency_combine(y, idx, w, h)
torch.cuda.synchronize()
from _timing import host_profile as host  # noqa: E402  (scripts/ is on sys.path when run as a script)

host("dispatch", lambda: buf.low_latency_dispatch(x, idx, M, E))
h_keep = buf.low_latency_dispatch(x, idx, M, E)[2]
host("combine", lambda: buf.low_latency_combine(y, idx, w, h_keep))
from torch.profiler import ProfilerActivity, profile  # noqa: E402

with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(20):
        rx, cnt, h, _, _ = buf.low_latency_dispatch(x, idx, M, E)
        buf.low_latency_combine(y, idx, w, h)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
buf.destroy()
dist.destroy_process_group()
