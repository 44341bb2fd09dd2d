"""``deep-ep bench --mode low-latency``: docs/bench.md's low-latency workload for deep_ep's backends.

Per backend: ``low_latency_dispatch`` (fp8) and ``low_latency_combine``
(bf16) timed eagerly with CUDA events (L2 flushed; CPU: wall clock), and on
nvlink also replayed from a CUDA graph (the GPU time without Python's launch
cost, how DeepEP's kernel times compare). Bytes per DeepEP's counting: per
valid (token, expert) pair ``H + 4H/128 + 16`` for fp8 dispatch, ``2H`` for
combine. ``--sweep`` runs 1..512 tokens. The ``collective`` backend is the
baseline (same outputs, a host synchronisation per call).
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile

import torch
import torch.distributed as dist

from deep_ep.bench.launch import init_rank, launch
from deep_ep.bench.report import REDUCE, _gbps, _mean, format_gbps
from deep_ep.bench.timing import CpuTimer, CudaTimer, capture_graph, median
from deep_ep.bench.workload import make_routing

__all__ = ["experts_of", "run_low_latency", "format_low_latency"]


def experts_of(cfg) -> int:
    """The experts of a low-latency run: docs/bench.md's 256, 288 where the ranks do not divide 256 (unless
    ``--experts`` was given).

    Args:
        cfg: the run's :class:`~deep_ep.bench.options.BenchConfig`.

    Returns:
        The number of experts.
    """
    if cfg.experts_given:
        return cfg.experts
    return 256 if 256 % cfg.world_size == 0 else 288


def _rank(rank: int, cfg, port: int, path: str) -> None:
    cuda = cfg.device == "cuda"
    world = cfg.world_size
    device = init_rank(rank, world, cfg.device, port, cfg.timeout_s)
    import deep_ep
    from deep_ep.bench.cases import open_agreed
    from deep_ep.bench.worker import backends_to_run, with_support_reason

    ctrl = dist.new_group(backend="gloo")
    timer = CudaTimer(device, cfg.flush_bytes) if cuda else CpuTimer(ctrl)
    E, H, K = experts_of(cfg), cfg.hidden, cfg.topk
    M = max(cfg.tokens)
    records, skipped, unavailable = [], [], {}
    names, unsupported = backends_to_run(cfg, dist.group.WORLD)
    hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(M, H, world, E)
    buffers = {}
    for name in names:  # every Buffer made first: a backend that cannot run costs no run
        if name in unsupported:
            skipped.append(dict(backend=name, reason=unsupported[name]))
            continue
        buf, reason = open_agreed(
            lambda name=name: deep_ep.Buffer(dist.group.WORLD, max(hint, 64 << 20), backend=name), ctrl
        )
        if reason:
            reason = with_support_reason(name, reason, dist.group.WORLD)
            skipped.append(dict(backend=name, reason=reason))
            unavailable[name] = reason
        else:
            buffers[name] = buf
    for name, buf in buffers.items():
        for T in cfg.tokens:
            idx, w = make_routing(T, E, K, cfg.routing, cfg.seed, rank)
            idx, w = idx.to(device), w.to(device)
            x = torch.randn((T, H), device=device).to(torch.bfloat16)
            out = buf.low_latency_dispatch(x, idx, M, E)
            handle = out[2]
            L = E // world
            y = torch.randn((L, world * M, H), device=device).to(torch.bfloat16)
            pairs = int((idx >= 0).sum())
            cases = [
                ("dispatch", "fp8", lambda: buf.low_latency_dispatch(x, idx, M, E), H + 4 * H // 128 + 16),
                ("combine", "bf16", lambda: buf.low_latency_combine(y, idx, w, handle), 2 * H),
            ]
            for op, wire, fn, per_pair in cases:
                base = dict(
                    backend=name, op=op, wire=wire, tokens=T, pairs=pairs, bytes=pairs * per_pair, transport=buf.backend
                )
                records.append(dict(base, timing="eager", times_us=timer(fn, cfg.iters, cfg.warmup)))
                if cuda and buf.backend == "nvlink":
                    g = capture_graph(fn)
                    records.append(dict(base, timing="graph", times_us=timer(g.replay, cfg.iters, cfg.warmup)))
                    del g
        buf.destroy()
    gathered = [None] * world
    dist.all_gather_object(gathered, records)
    if rank == 0:
        card = torch.cuda.get_device_name(device) if cuda else "cpu"
        with open(path, "wb") as f:
            pickle.dump(
                dict(
                    records=gathered,
                    skipped=skipped,
                    unavailable=unavailable,
                    card=card,
                    experts=E,
                    M=M,
                    threads=torch.get_num_threads(),
                ),
                f,
            )
    dist.barrier()
    dist.destroy_process_group()


def run_low_latency(cfg, command: str) -> dict:
    """Spawn the ranks and time every case of the low-latency workload.

    Args:
        cfg: the run (``workload`` ``'low-latency'``).
        command: the command line recorded in the result.

    Returns:
        The docs/bench.md result object (workload ``low-latency``; ``unavailable``: backends asked for by
        name that could not run; ``threads_per_rank``: the CPU ranks' torch threads).
    """
    from deep_ep.bench.environment import versions

    with tempfile.TemporaryDirectory(prefix="deep_ep_ll_") as tmp:
        path = os.path.join(tmp, "raw.pkl")
        launch(_rank, (cfg,), path, cfg.world_size, cfg.device, fork_ok=False)
        with open(path, "rb") as f:
            raw = pickle.load(f)
    by_case: dict = {}
    for recs in raw["records"]:
        for r in recs:
            by_case.setdefault((r["tokens"], r["backend"], r["op"], r["wire"], r["timing"]), []).append(r)
    rows = []
    for (T, backend, op, wire, timing), recs in by_case.items():
        t = max(median(r["times_us"]) for r in recs)
        nbytes = _mean(r["bytes"] for r in recs)
        rows.append(
            dict(
                backend=backend,
                op=op,
                wire=wire,
                tokens=T,
                hidden=cfg.hidden,
                topk=cfg.topk,
                experts=raw["experts"],
                num_sms=None,
                time_us=t,
                gbps_logical=_gbps(nbytes, t),
                gbps_link=None,
                graph=timing == "graph",
                timing=timing,
                transport=recs[0]["transport"],
                pairs_per_rank=_mean(r["pairs"] for r in recs),
                time_us_per_rank=[median(r["times_us"]) for r in recs],
            )
        )
    base = {(r["tokens"], r["op"], r["timing"]): r for r in rows if r["backend"] == "collective"}
    for r in rows:
        b = base.get((r["tokens"], r["op"], "eager"))
        if b is not None and r["backend"] != "collective" and r["time_us"]:
            r["ratio_vs"] = {"collective": b["time_us"] / r["time_us"]}
    v = versions()
    return {
        "workload": "low-latency",
        "card": raw["card"],
        "num_ranks": cfg.world_size,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": v["triton"],
        "command": command,
        "rows": rows,
        "deep_ep": v["deep_ep"],
        "mode": "low-latency",
        "device": cfg.device,
        "dist_backend": cfg.dist_backend,
        "routing": cfg.routing,
        "iters": cfg.iters,
        "warmup": cfg.warmup,
        "num_max_dispatch_tokens_per_rank": raw["M"],
        "reduce": REDUCE,
        "bytes": "per valid (token, expert) pair: fp8 dispatch H + 4H/128 + 16, bf16 combine 2H (DeepEP's)",
        "skipped": raw["skipped"],
        "unavailable": raw.get("unavailable", {}),
        "threads_per_rank": raw.get("threads"),
        "l2_flush_bytes": cfg.flush_bytes if cfg.device == "cuda" else 0,
    }


def format_low_latency(result: dict) -> str:
    """The low-latency result as a text table (as :func:`deep_ep.bench.report.format_table` lays out its own).

    Args:
        result: what :func:`run_low_latency` returns.

    Returns:
        The table, the skipped backends with their reasons and what the columns count.
    """
    head = ["backend", "op", "timing", "wire", "tokens", "time_us", "GB/s", "vs collective"]
    lines = []
    for r in result["rows"]:
        ratio = r.get("ratio_vs", {}).get("collective")
        lines.append(
            [
                f"{r['backend']} ({r['transport']})" if r["transport"] != r["backend"] else r["backend"],
                r["op"],
                r["timing"],
                r["wire"],
                str(r["tokens"]),
                f"{r['time_us']:.1f}",
                format_gbps(r["gbps_logical"]),
                f"{ratio:.2f}" if ratio else "-",
            ]
        )
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]

    def fmt_line(cells):
        return "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [
        f"low-latency on {result['num_ranks']} x {result['card']} ({result['dist_backend']}, "
        f"M = {result['num_max_dispatch_tokens_per_rank']}, median of {result['iters']}, time = slowest rank)",
        fmt_line(head),
        fmt_line(["-" * w for w in widths]),
    ]
    out += [fmt_line(c) for c in lines]
    for s in result["skipped"]:
        out.append(f"skipped {s['backend']}: {s['reason']}")
    out.append(
        "GB/s: bytes per valid (token, expert) pair (fp8 dispatch H + 4H/128 + 16, bf16 combine 2H; "
        "DeepEP's counting) / time"
    )
    return "\n".join(out)
