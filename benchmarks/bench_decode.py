"""Decoding latency of ``ExpertParallelMoE.decode`` (the low-latency kernels; one or two micro-batches
overlapped through the receive hooks) beside the layer's normal forward, in one run (issue 7).

Run with ``torchrun --nproc-per-node 2 benchmarks/bench_decode.py [--json PATH]`` (one GPU per rank with
NCCL; CPU ranks with gloo when there is no GPU, e.g. ``--small`` for a quick check).

Default shape: DeepSeek-V3's MoE layer at decoding (``--tokens`` 128 per rank, hidden 7168, 256 routed
experts of width 2048, top-8, fp8 dispatch, bf16 combine, one shared expert). Cases, each timed over
``--iters`` calls after ``--warmup`` (:mod:`deep_ep.bench.timing`: CUDA events with the L2 flushed on GPU,
wall clock after a barrier on CPU; a call's time is the slowest rank's, the median is reported):

* ``forward``: ``layer(x)`` under ``torch.no_grad`` (normal dispatch and combine, one chunk);
* ``decode-1`` / ``decode-2``: ``layer.decode(x, tokens, micro_batches=1 | 2)``, eager;
* ``decode-1-graph`` / ``decode-2-graph``: the same captured once in a CUDA graph and replayed (GPU, nvlink).

Outputs of the decode cases are checked against each other (same routing: equal to bf16 rounding).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch
import torch.distributed as dist

import deep_ep
from deep_ep.bench.launch import local_rank
from deep_ep.bench.timing import CpuTimer, CudaTimer, capture


def parse_args(argv=None):
    """The benchmark's options (``--small``: a quick CPU-sized shape)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=128, help="tokens per rank (default 128)")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--shared", type=int, default=1, help="shared experts (default 1)")
    p.add_argument("--no-fp8", action="store_true", help="bf16 dispatch")
    p.add_argument("--backend", default="auto")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--small", action="store_true", help="a quick shape (hidden 256, 16 experts, ffn 64, top-4)")
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    if a.small:
        a.hidden, a.experts, a.ffn, a.topk, a.tokens = 256, 16, 64, 4, min(a.tokens, 32)
    return a


def run(args) -> dict:
    """The benchmark on the initialised default process group; the result (on every rank)."""
    rank, R = dist.get_rank(), dist.get_world_size()
    cuda = deep_ep.transport.group_on_cuda()
    if cuda:
        torch.cuda.set_device(local_rank(rank % torch.cuda.device_count()))
    dev = deep_ep.transport.group_device()
    layer = deep_ep.ExpertParallelMoE(
        args.hidden,
        args.ffn,
        args.experts,
        args.topk,
        num_shared_experts=args.shared,
        backend=args.backend,
        dtype=torch.bfloat16,
        device=dev,
    ).requires_grad_(False)
    g = torch.Generator().manual_seed(1000 + rank)
    x = (torch.randn(args.tokens, args.hidden, generator=g) * 0.5).to(dev, torch.bfloat16)
    fp8 = not args.no_fp8
    cases = {"forward": lambda: layer(x)}
    for mb in (1, 2):
        cases[f"decode-{mb}"] = lambda mb=mb: layer.decode(x, args.tokens, micro_batches=mb, use_fp8=fp8)
    outs = {}
    with torch.no_grad():
        for mb in (1, 2):
            outs[mb] = cases[f"decode-{mb}"]().float()
        if cuda and layer.buffer.backend == "nvlink":
            for mb in (1, 2):
                graph, y = capture(cases[f"decode-{mb}"])
                replay = graph.replay
                replay()
                torch.cuda.synchronize()
                outs[f"graph-{mb}"] = y.float()
                cases[f"decode-{mb}-graph"] = replay
        rows = []
        timer = CudaTimer(dev) if cuda else CpuTimer(dist.group.WORLD)  # (docs/bench.md's timing, L2 flushed)
        for name, fn in cases.items():
            mine = torch.tensor(timer(fn, args.iters, args.warmup), dtype=torch.float64)
            allr = [torch.zeros_like(mine) for _ in range(R)]
            dist.all_gather(allr, mine.to(dev) if cuda else mine)
            slowest = torch.stack([t.cpu() for t in allr]).amax(dim=0).tolist()
            rows.append(dict(case=name, us=statistics.median(slowest), us_min=min(slowest)))
    ref = outs[1]
    agree = {k: float(((v - ref).abs().max() / ref.abs().max().clamp(min=1e-6)).item()) for k, v in outs.items()}
    return dict(
        benchmark="decode",
        card=torch.cuda.get_device_name(dev) if cuda else "cpu",
        num_ranks=R,
        date=datetime.date.today().isoformat(),
        torch=torch.__version__,
        transport=layer.buffer.backend,
        command=f"torchrun --nproc-per-node {R} benchmarks/bench_decode.py {' '.join(sys.argv[1:])}",
        shape=dict(
            tokens=args.tokens,
            hidden=args.hidden,
            ffn=args.ffn,
            experts=args.experts,
            topk=args.topk,
            shared=args.shared,
            fp8=fp8,
        ),
        rows=rows,
        max_rel_diff_vs_decode_1=agree,
    )


def main(argv=None) -> int:
    """Entry under torchrun: init the process group, run, print the table on rank 0, write ``--json``."""
    args = parse_args(argv)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank(0))
    dist.init_process_group(backend)
    try:
        res = run(args)
        if dist.get_rank() == 0:
            print(f"decode on {res['num_ranks']} x {res['card']} ({res['transport']}), {res['shape']}")
            for r in res["rows"]:
                print(f"  {r['case']:18s} {r['us']:10.1f} us  (min {r['us_min']:.1f})")
            print(f"  outputs vs decode-1 (max relative difference): {res['max_rel_diff_vs_decode_1']}")
            if args.json:
                os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
                with open(args.json, "w") as f:
                    json.dump(res, f, indent=1)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
