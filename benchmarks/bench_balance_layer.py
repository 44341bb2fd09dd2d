"""MoE layer step time with and without load balancing under skewed routing (issue 8).

Run with ``torchrun --nproc-per-node 2 benchmarks/bench_balance_layer.py [--json PATH]``
(one GPU per rank with NCCL; CPU ranks with gloo when there is no GPU, e.g.
``--small`` for a quick check).

The layer (default: DeepSeek-V2-Lite's MoE shape): ``--experts`` routed
experts, top-``--topk``, hidden ``--hidden``, SwiGLU experts of width
``--ffn``, ``--tokens`` tokens per rank in bf16 (fp32 on CPU). Routing is
Zipf(``--zipf``) over a random expert order, the same popularity on every
rank, ``topk`` distinct experts per token (successive sampling; see
:func:`deep_ep.balance.simulate.sample_topk`), a new sample every step.

One step: layout + dispatch, the experts of this rank's slots, combine.
Expert weights are stacked per local slot (``[S, H, 2F]`` and ``[S, F, H]``)
and computed two ways (``--impl``):

* ``grouped``: one matmul pair per local slot on its contiguous rows (what a
  grouped GEMM does; cost follows the real rows);
* ``padded``: ``torch.bmm`` over all slots with every slot padded to the
  largest slot's row count (capacity-style; cost follows the busiest slot).

Policies, in the same run on the same machine:

* ``static``: :class:`deep_ep.Buffer` with logical ids, experts contiguous
  (``E / R`` per rank), no replicas;
* ``balanced``: :class:`deep_ep.balance.BalancedDispatch` with ``--spare``
  spare slots per rank: after ``--plan-steps`` routed steps the placement is
  planned from the forecast and the weights migrate; then every step routes
  with the load-aware quotas of its all-reduced counts.

Time: per step, per phase, CUDA events on GPU (``time.perf_counter`` on CPU);
a step's time is the slowest rank's; median over ``--iters`` steps after
``--warmup``, ``--rounds`` rounds of the policies in turn pooled. Also the
pairs each rank computes (max/mean over ranks) and a check that both policies
give the same layer output. Writes the docs/bench.md result JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deep_ep  # noqa: E402
from deep_ep.balance import BalancedDispatch  # noqa: E402
from deep_ep.balance.simulate import sample_topk  # noqa: E402
from deep_ep.bench.launch import local_rank  # noqa: E402

SMALL = dict(tokens=64, hidden=32, ffn=32, experts=8, topk=2, iters=5, warmup=2, plan_steps=5, rounds=1)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node 2 benchmarks/bench_balance_layer.py", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=1408, help="expert FFN width (SwiGLU)")
    ap.add_argument("--experts", type=int, default=64, help="logical routed experts")
    ap.add_argument("--topk", type=int, default=6)
    ap.add_argument("--spare", type=int, default=2, help="spare expert slots per rank (balanced policy)")
    ap.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent of expert popularity")
    ap.add_argument("--impl", default="grouped,padded", help="expert computation(s): grouped, padded")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of all policies in turn (timings pooled)")
    ap.add_argument("--plan-steps", type=int, default=20, help="routed steps the balanced policy plans from")
    ap.add_argument("--backend", default="auto", help="deep_ep.Buffer backend")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--small",
        action="store_true",
        help="tiny shapes for a CPU/gloo check: " + ", ".join(f"{k}={v}" for k, v in SMALL.items()),
    )
    ap.add_argument("--json", default=None, help="write the result file here (rank 0)")
    ap.add_argument("--quiet", action="store_true", help="print nothing (the result file and return value only)")
    args = ap.parse_args(argv)
    if args.small:
        for k, v in SMALL.items():
            setattr(args, k, v)
    return args


class Timer:
    """Marks inside a step: CUDA events on GPU (no sync until :meth:`read`), ``perf_counter`` on CPU."""

    def __init__(self, dev: torch.device) -> None:
        self.cuda = dev.type == "cuda"
        self.marks = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def read(self) -> list:
        """Milliseconds between consecutive marks; resets."""
        if self.cuda:
            torch.cuda.synchronize()
            out = [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        else:
            out = [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]
        self.marks = []
        return out


def expert_weights(slot_experts: torch.Tensor, hidden: int, ffn: int, dtype, dev, seed: int):
    """``W1 [S, H, 2F]``, ``W2 [S, F, H]``: slot ``i`` holds logical expert ``slot_experts[i]``'s weights
    (drawn from a generator seeded by the expert id, so replicas are identical)."""
    w1, w2 = [], []
    for e in slot_experts.tolist():
        g = torch.Generator(device=dev).manual_seed(seed * 100003 + e)
        w1.append((torch.randn(hidden, 2 * ffn, generator=g, device=dev) / hidden**0.5).to(dtype))
        w2.append((torch.randn(ffn, hidden, generator=g, device=dev) / ffn**0.5).to(dtype))
    return torch.stack(w1), torch.stack(w2)


def run_experts(recv_x, recv_idx, recv_w, counts, W1, W2, impl: str) -> torch.Tensor:
    """``y[row] = sum_k w[row, k] * SwiGLU_{slot k}(x[row])`` over this rank's slots (fp32 sum, x's dtype)."""
    N, H = recv_x.shape
    S = W1.size(0)
    rows, ks = (recv_idx >= 0).nonzero(as_tuple=True)
    slots = recv_idx[rows, ks]
    order = torch.argsort(slots, stable=True)  # pairs grouped by slot
    rows, ks, slots = rows[order], ks[order], slots[order]
    xin = recv_x.index_select(0, rows)
    if impl == "grouped":
        outs, off = [], 0
        for s, c in enumerate(counts):
            if c:
                g, u = (xin[off : off + c] @ W1[s]).chunk(2, dim=-1)
                outs.append((F.silu(g) * u) @ W2[s])
                off += c
        out = torch.cat(outs) if outs else xin.new_zeros((0, H))
    elif impl == "padded":
        cap = max(max(counts), 1)
        cnt = torch.tensor(counts, dtype=torch.int64, device=recv_x.device)
        pos = torch.arange(slots.numel(), device=recv_x.device) - (torch.cumsum(cnt, 0) - cnt)[slots]
        padded = recv_x.new_zeros((S, cap, H))
        padded[slots, pos] = xin
        g, u = torch.bmm(padded, W1).chunk(2, dim=-1)
        out = torch.bmm(F.silu(g) * u, W2)[slots, pos]
    else:
        raise ValueError(f"unknown --impl {impl!r}")
    y = torch.zeros((N, H), dtype=torch.float32, device=recv_x.device)
    y.index_add_(0, rows, out.float() * recv_w[rows, ks].float().unsqueeze(1))
    return y.to(recv_x.dtype)


def main(argv=None) -> int:
    """Entry point under torchrun: initialise the process group (NCCL with GPUs, else gloo), run, tear down."""
    args = parse_args(argv)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        run(args, argv)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def run(args, argv=None) -> dict:
    """The benchmark on the initialised default process group; returns the result dict (on every rank)."""
    use_cuda = torch.cuda.is_available() and "nccl" in str(dist.get_backend()).lower()
    rank, R = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        dev = torch.device("cuda", local_rank(rank % torch.cuda.device_count()))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    E, K, T, Hd = args.experts, args.topk, args.tokens, args.hidden
    if E % R:
        raise SystemExit(f"--experts {E} must be a multiple of the {R} ranks")
    impls = [i for i in args.impl.split(",") if i]
    buf = deep_ep.Buffer(dist.group.WORLD, backend=args.backend)

    # routing: the same Zipf popularity everywhere, per-rank token samples, one per step
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(E, generator=g)
    logpop = torch.empty(E, dtype=torch.float64)
    logpop[order] = -args.zipf * torch.log(torch.arange(1, E + 1, dtype=torch.float64))
    n_steps = args.plan_steps + args.warmup + args.iters
    gr = torch.Generator().manual_seed(args.seed * 1000 + 1 + rank)
    trace = sample_topk(logpop.view(1, E).expand(n_steps, E).contiguous(), T, K, gr)  # [steps, T, K]
    idx_steps = [trace[s].to(dev) for s in range(n_steps)]
    w_steps = [torch.softmax(torch.randn(T, K, generator=gr), dim=1).to(dev) for _ in range(n_steps)]
    x = (torch.randn(T, Hd, generator=gr) * 0.5).to(dev, dtype)

    # the two layers
    L = E // R
    static_w = expert_weights(torch.arange(rank * L, (rank + 1) * L), Hd, args.ffn, dtype, dev, args.seed)
    bd = BalancedDispatch(buf, E, num_slots=E + args.spare * R, window=max(args.plan_steps, 2))
    bal_w = list(expert_weights(bd.local_experts, Hd, args.ffn, dtype, dev, args.seed))
    t0 = time.perf_counter()
    for s in range(args.plan_steps):
        bd.route(idx_steps[s])
    plan_figs_before = bd.imbalance()
    bd.maybe_replan(1, bal_w, force=True)
    plan_ms = (time.perf_counter() - t0) * 1e3
    plan_figs_after = bd.imbalance()

    def step(policy: str, impl: str, s: int, timer: Timer):
        ti, w = idx_steps[s], w_steps[s]
        timer.mark()
        if policy == "static":
            per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(ti, E)
            recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
                x,
                num_tokens_per_rank=per_rank,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert,
                topk_idx=ti,
                topk_weights=w,
            )
            W1, W2 = static_w
        else:
            recv_x, recv_idx, recv_w, counts, handle, _ = bd.dispatch(x, ti, w)
            W1, W2 = bal_w
        timer.mark()
        y = run_experts(recv_x, recv_idx, recv_w, counts, W1, W2, impl)
        timer.mark()
        out = (buf if policy == "static" else bd).combine(y, handle)[0]
        timer.mark()
        return out, sum(counts)

    # same output under both policies (bf16 rounding apart)
    with torch.no_grad():
        s0 = args.plan_steps
        ref_out, _ = step("static", impls[0], s0, Timer(dev))
        bal_out, _ = step("balanced", impls[0], s0, Timer(dev))
    diff = float((ref_out.float() - bal_out.float()).abs().max())
    scale = float(ref_out.float().abs().max())
    diff_t = torch.tensor([diff / max(scale, 1e-30)], dtype=torch.float64, device=dev)
    dist.all_reduce(diff_t, op=dist.ReduceOp.MAX)
    rel_diff = float(diff_t)

    policies = ("static", "balanced")
    samples = {
        (p, i): {"total": [], "dispatch": [], "experts": [], "combine": [], "pairs": []}
        for p in policies
        for i in impls
    }
    timer = Timer(dev)
    with torch.no_grad():
        for _ in range(args.rounds):
            for impl in impls:
                for pol in policies:
                    rec = samples[(pol, impl)]
                    for it in range(args.warmup + args.iters):
                        s = args.plan_steps + it
                        _, pairs = step(pol, impl, s, timer)
                        ph = timer.read()
                        if it < args.warmup:
                            continue
                        # the slowest rank's figures of this step (collectives tie the ranks together)
                        v = torch.tensor([sum(ph)] + ph, dtype=torch.float64, device=dev)
                        dist.all_reduce(v, op=dist.ReduceOp.MAX)
                        p = torch.zeros(R, dtype=torch.float64, device=dev)
                        p[rank] = pairs
                        dist.all_reduce(p)
                        for key, val in zip(("total", "dispatch", "experts", "combine"), v.tolist()):
                            rec[key].append(val)
                        rec["pairs"].append(p.cpu())
        # route alone (count all-reduce + quotas + replica choice), quotas solved on the host / on the device
        route_ms = {}
        for where in ("host", "device"):
            bd.host_quotas = where == "host"
            route_ms[where] = []
            for it in range(args.warmup + args.iters):
                timer.mark()
                bd.route(idx_steps[args.plan_steps + it])
                timer.mark()
                v = torch.tensor(timer.read(), dtype=torch.float64, device=dev)
                if it >= args.warmup:
                    dist.all_reduce(v, op=dist.ReduceOp.MAX)
                    route_ms[where].append(float(v[0]))
        bd.host_quotas = True
        route_us = {k: statistics.median(v) * 1e3 for k, v in route_ms.items()}

    buf.destroy()
    card = torch.cuda.get_device_name(dev) if use_cuda else "cpu"
    rows = []
    for (pol, impl), rec in samples.items():
        pairs = torch.stack(rec["pairs"])  # [iters, R]
        mom = (pairs.max(1).values / pairs.mean(1).clamp(min=1e-9)).mean()
        rows.append(
            dict(
                backend="deep_ep-balanced" if pol == "balanced" else "static",
                op="step",
                impl=impl,
                transport=buf.backend,
                wire="bf16" if dtype == torch.bfloat16 else "fp32",
                tokens=T,
                hidden=Hd,
                ffn=args.ffn,
                topk=K,
                experts=E,
                num_slots=bd.num_slots if pol == "balanced" else E,
                zipf=args.zipf,
                time_us=statistics.median(rec["total"]) * 1e3,
                time_us_p10=sorted(rec["total"])[len(rec["total"]) // 10] * 1e3,
                time_us_p90=sorted(rec["total"])[(len(rec["total"]) * 9) // 10] * 1e3,
                dispatch_us=statistics.median(rec["dispatch"]) * 1e3,
                experts_us=statistics.median(rec["experts"]) * 1e3,
                combine_us=statistics.median(rec["combine"]) * 1e3,
                pairs_per_rank=pairs.mean(0).tolist(),
                pairs_max_over_mean=float(mom),
                samples=len(rec["total"]),
            )
        )
    speedup = {}
    for impl in impls:
        st = next(r for r in rows if r["impl"] == impl and r["backend"] == "static")
        ba = next(r for r in rows if r["impl"] == impl and r["backend"] == "deep_ep-balanced")
        speedup[impl] = st["time_us"] / ba["time_us"]
    if rank == 0 and not args.quiet:
        print(
            f"{R} ranks, {card}, transport {buf.backend}: {T} tokens/rank, hidden {Hd}, ffn {args.ffn}, "
            f"top-{K} of {E} experts, Zipf {args.zipf}; balanced: {bd.num_slots} slots, "
            f"{bd.last_moves} expert copies moved at the plan ({plan_ms:.0f} ms incl. {args.plan_steps} routes)"
        )
        print(
            f"{'policy':<17} {'impl':<8} {'step us':>9} {'dispatch':>9} {'experts':>9} {'combine':>9} "
            f"{'pairs max/mean':>14}"
        )
        for r in rows:
            print(
                f"{r['backend']:<17} {r['impl']:<8} {r['time_us']:>9.0f} {r['dispatch_us']:>9.0f} "
                f"{r['experts_us']:>9.0f} {r['combine_us']:>9.0f} {r['pairs_max_over_mean']:>14.3f}"
            )
        print("speedup (static / balanced): " + ", ".join(f"{k} {v:.2f}x" for k, v in speedup.items()))
        print(
            f"route alone: {route_us['host']:.0f} us (quotas on the host, used above), {route_us['device']:.0f} us "
            f"(on the device); outputs agree: max rel diff {rel_diff:.2e}"
        )
    out = {
        "workload": "balance-layer",
        "card": card,
        "num_ranks": R,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "command": "torchrun --nproc-per-node {} benchmarks/bench_balance_layer.py {}".format(
            R, " ".join(sys.argv[1:] if argv is None else argv)
        ),
        "device": str(dev),
        "dist_backend": dist.get_backend(),
        "transport": buf.backend,
        "iters": args.iters,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "plan_steps": args.plan_steps,
        "routing": f"zipf{args.zipf} over a random expert order, top-{K} distinct, new sample per step",
        "timing": ("CUDA events" if use_cuda else "perf_counter") + ", slowest rank per step, median over steps",
        "balanced": dict(
            num_slots=bd.num_slots,
            spare_per_rank=args.spare,
            moved_at_plan=bd.last_moves,
            plan_ms=plan_ms,
            phy2log=bd.phy2log.tolist(),
            planned_from=dict(before=plan_figs_before, after=plan_figs_after),
            route_us=route_us,
        ),
        "outputs_max_rel_diff": rel_diff,
        "speedup": speedup,
        "rows": rows,
    }
    if rank == 0 and args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        if not args.quiet:
            print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    sys.exit(main())
