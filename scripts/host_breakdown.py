"""Where the host time of the nvlink device path goes, on one GPU (one rank): the host cost of single
launches (torch ops, Triton kernels, events, record_stream, the device barrier) and of whole calls, the
GPU time of the device path (graph-replayed), then a cumulative cProfile and a torch-profiler op count of a
fresh ``num_worst_tokens`` dispatch and its combine.

    python scripts/host_breakdown.py [tokens] [hidden] > host.txt
"""

import os
import pstats
import sys
import time

import torch
import torch.distributed as dist

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29549")
torch.cuda.set_device(0)
dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
from _timing import profile_calls  # noqa: E402  (scripts/ is on sys.path when run as a script)

import deep_ep  # noqa: E402
from deep_ep.kernels import scatter  # noqa: E402

T = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
H = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
E, K = 64, 8
buf = deep_ep.Buffer(dist.group.WORLD, backend="nvlink")
x = torch.randn((T, H), device="cuda").to(torch.bfloat16)
idx = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)])
w = torch.rand((T, K), device="cuda")


def per_call(label, fn, n=200, batches=11):
    """Host microseconds per call: the median over ``batches`` batches of ``n / batches`` calls (this
    machine's host time jitters by tens of percent; a batch's mean with the GPU kept busy, then a sync)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    k = max(n // batches, 1)
    means = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        means.append((time.perf_counter() - t0) / k * 1e6)
        torch.cuda.synchronize()
    print(f"{label:58s} {sorted(means)[len(means) // 2]:8.1f} us host per call", flush=True)


small = torch.zeros(16, device="cuda")
ev = torch.cuda.Event()
tr = buf._transport
dst = torch.empty((T, H // 4), dtype=torch.int64, device="cuda")
srcw = x.view(torch.int64)
bounds = torch.tensor([T, 0, 0], device="cuda")
slot = torch.zeros((T, 1), dtype=torch.int64, device="cuda")
region = dst
delta = torch.zeros(1, dtype=torch.int64, device="cuda")
per_call("torch.empty((16,))", lambda: torch.empty(16, device="cuda"))
per_call("small.add_(1)", lambda: small.add_(1))
per_call("index_select of rows", lambda: torch.index_select(srcw, 0, idx[:, 0], out=dst))
per_call("t.record_stream(s)", lambda: small.record_stream(torch.cuda.current_stream()))
per_call("Event() + record", lambda: torch.cuda.Event().record())
per_call("torch.cuda.is_current_stream_capturing()", torch.cuda.is_current_stream_capturing)
per_call("symm-mem barrier", tr._barrier)
per_call("triton copy_out (3 tensor args, 2 ints, 3 constexpr)", lambda: scatter.copy_out(srcw, dst, bounds, 24))
per_call(
    "triton scatter_rows (5 tensors, 4 ints, 5 constexpr)",
    lambda: scatter.scatter_rows(srcw, slot, dst, region, delta, 0, 24),
)
per_call("get_dispatch_layout", lambda: buf.get_dispatch_layout(idx, E))
lay = buf.get_dispatch_layout(idx, E)


def fresh(worst):
    per_rank, _, per_expert, in_rank, _ = lay
    return buf.dispatch(
        x,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=idx,
        topk_weights=w,
        num_worst_tokens=worst,
        async_finish=True,
    )


rx, _, _, _, handle, _ = fresh(T)
rx0, _, _, _, handle0, _ = fresh(0)
per_call("fresh dispatch, num_worst_tokens (device path)", lambda: fresh(T))
per_call("fresh dispatch, counts read on the host", lambda: fresh(0), n=100)
per_call("cached dispatch (host handle)", lambda: buf.dispatch(x, handle=handle0))
per_call("combine of a device-path handle", lambda: buf.combine(rx, handle, async_finish=True))
per_call("combine of a host handle", lambda: buf.combine(rx0, handle0, async_finish=True))

# GPU time of the device path (graph-replayed: no host time in it), median of 50 replays
from deep_ep.bench.timing import capture  # noqa: E402


def fresh_sync(worst):
    per_rank, _, per_expert, in_rank, _ = lay
    return buf.dispatch(
        x,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=idx,
        topk_weights=w,
        num_worst_tokens=worst,
    )


for label, fn in (
    ("fresh dispatch, num_worst_tokens", lambda: fresh_sync(T)),
    ("get_dispatch_layout", lambda: buf.get_dispatch_layout(idx, E)),
    ("combine, device handle", lambda: buf.combine(rx, handle)),
):
    graph, _ = capture(fn)
    times = []
    for _ in range(50):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    print(f"{'graph-replayed ' + label:58s} {sorted(times)[25]:8.1f} us GPU", flush=True)

for label, fn in (
    ("fresh dispatch, num_worst_tokens", lambda: fresh(T)),
    ("fresh dispatch, host", lambda: fresh(0)),
    ("combine, device handle", lambda: buf.combine(rx, handle, async_finish=True)),
):
    n = 50
    pr = profile_calls(fn, n)
    print(f"\n===== cProfile, {label}, {n} calls, cumulative", flush=True)
    pstats.Stats(pr, stream=sys.stdout).sort_stats("cumulative").print_stats(45)
    print(f"\n===== cProfile, {label}, {n} calls, own time", flush=True)
    pstats.Stats(pr, stream=sys.stdout).sort_stats("tottime").print_stats(30)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    print(f"\n===== torch profiler, {label}, 10 calls", flush=True)
    print(prof.key_averages().table(sort_by="count", row_limit=45, max_name_column_width=60))
buf.destroy()
dist.destroy_process_group()
