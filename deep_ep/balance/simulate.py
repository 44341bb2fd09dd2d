"""Simulated drifting MoE routing and the balance policies compared on it.

Used by ``benchmarks/bench_balance.py`` (full size) and by the tests (small).

Trace (:func:`make_trace`)
--------------------------
``E`` experts with Zipf(``zipf``) popularity over a random expert order; every
step each expert's log-popularity takes an independent Gaussian step
(``sigma``). Every ``burst_every`` steps one uniformly random expert is
boosted ``burst_factor``-fold for ``burst_len`` steps; the burst starts at a
uniformly random offset inside its block (``[0, burst_every - burst_len]``),
so re-plans meet bursts at every phase. Each step ``tokens`` tokens are
sampled, each choosing ``topk`` distinct experts by successive sampling
without replacement proportional to popularity (docs/bench.md's skewed routing);
the trace keeps the per-step per-expert counts.

Policies (:func:`simulate`)
---------------------------
All policies start from the static contiguous placement and (except
``static``) re-plan every ``replan_every`` steps from the history of the last
``window`` steps; figures are taken over the steps after the first plan.

* ``static``: expert ``e`` on GPU ``e // (E / G)``, spare slots unused.
* ``eplb``: EPLB practice -- DeepSeek EPLB's greedy planner
  (:func:`eplb_reference`, an independent re-implementation of the published
  algorithm) fed with the window mean; each expert's pairs split evenly
  among its replicas.
* ``deep_ep``: :meth:`LoadMonitor.forecast` (horizon = the re-plan interval)
  -> :func:`rebalance_experts` (``headroom=0.5``, adapting the previous
  placement, ``move_slack=0.05``) -> :class:`ReplicaRouter` quotas from each
  step's global counts (what ``route`` realises exactly with ``[R, E]``
  counts; the tests check that).
* ablations: ``eplb+steal`` (EPLB plan, load-aware split), ``deep_ep-even``
  (deep_ep plan, even split), ``deep_ep-mean`` (window mean instead of the
  forecast, deep_ep planner and split).

The per-GPU load of a step is the number of (token, expert) pairs its slots
receive; max/mean and std/mean are over GPUs, then mean / p99 over steps.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .monitor import LoadMonitor, imbalance_figures
from .placement import contiguous_phy2log, gpu_loads, moved_experts
from .planner import rebalance_experts
from .router import ReplicaRouter

__all__ = [
    "TraceConfig",
    "Trace",
    "make_trace",
    "sample_topk",
    "eplb_reference",
    "simulate",
    "POLICIES",
    "contiguous_phy2log",
]

log = logging.getLogger("deep_ep.balance")

#: Policy names accepted by :func:`simulate` (module docstring).
POLICIES = ("static", "eplb", "deep_ep", "eplb+steal", "deep_ep-even", "deep_ep-mean")


@dataclasses.dataclass
class TraceConfig:
    """Parameters of the drifting-popularity routing trace (see the module docstring)."""

    num_experts: int = 256
    topk: int = 8
    zipf: float = 1.2
    sigma: float = 0.05
    burst_every: int = 100
    burst_len: int = 40
    burst_factor: float = 20.0
    tokens: int = 8192
    steps: int = 1000
    seed: int = 0


@dataclasses.dataclass
class Trace:
    """A sampled trace: ``counts`` int64 ``[steps, E]``, the popularity it was drawn from
    (``logpop`` float64 ``[steps, E]``, bursts included) and the bursts ``(start, expert)``."""

    config: TraceConfig
    counts: torch.Tensor
    logpop: torch.Tensor
    bursts: List[Tuple[int, int]]


def sample_topk(logpop: torch.Tensor, tokens: int, topk: int, gen: torch.Generator) -> torch.Tensor:
    """Routing of ``tokens`` tokens for each row of ``logpop [S, E]``: int64 ``[S, tokens, topk]``.

    Each token draws ``topk`` distinct experts by successive sampling
    proportional to ``exp(logpop)``: the ``k``-th expert is drawn from the
    popularity restricted to the experts not yet taken, by drawing a uniform
    number on the remaining mass and stepping over the taken experts'
    intervals of the CDF (vectorised over rows and tokens, no rejection loop).
    """
    steps, num_experts = logpop.shape
    p = torch.softmax(logpop.to(torch.float64), dim=1)  # [S, E]
    cdf = torch.cumsum(p, dim=1)
    cdf[:, -1] = 1.0
    lo = cdf - p
    flat_p, flat_lo = p.reshape(-1), lo.reshape(-1)
    base = (torch.arange(steps, dtype=torch.int64) * num_experts).view(steps, 1, 1)
    out = torch.empty(steps, tokens, topk, dtype=torch.int64)
    for k in range(topk):
        u = torch.rand(steps, tokens, dtype=torch.float64, generator=gen)
        if k:
            taken = torch.sort(out[:, :, :k], dim=2).values + base  # ascending = CDF order
            pt = flat_p[taken]  # [S, T, k]
            lt = flat_lo[taken]
            u = u * (1.0 - pt.sum(2))
            for j in range(k):  # step over taken intervals
                u = u + pt[:, :, j] * (u >= lt[:, :, j])
        d = torch.searchsorted(cdf, u, right=True).clamp_(max=num_experts - 1)
        if k:
            # rounding can land on a taken expert's edge: redraw those few by rejection
            bad = (d.unsqueeze(2) == out[:, :, :k]).any(2)
            while bool(bad.any()):
                si, ti = bad.nonzero(as_tuple=True)
                r = torch.rand(si.shape[0], dtype=torch.float64, generator=gen)
                nd = torch.searchsorted(cdf[si], r.view(-1, 1), right=True).view(-1).clamp_(max=num_experts - 1)
                d[si, ti] = nd
                bad = (d.unsqueeze(2) == out[:, :, :k]).any(2)
        out[:, :, k] = d
    return out


def make_trace(cfg: TraceConfig, chunk: int = 8) -> Trace:
    """Sample the trace of ``cfg`` (deterministic in ``cfg.seed``)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    E = cfg.num_experts
    order = torch.randperm(E, generator=gen)
    base = torch.empty(E, dtype=torch.float64)
    base[order] = -cfg.zipf * torch.log(torch.arange(1, E + 1, dtype=torch.float64))
    steps = torch.randn(cfg.steps, E, dtype=torch.float64, generator=gen) * cfg.sigma
    steps[0] = 0.0
    walk = base + torch.cumsum(steps, 0)
    boost = torch.zeros(cfg.steps, E, dtype=torch.float64)
    bursts = []
    span = max(cfg.burst_every - cfg.burst_len, 0)
    for start0 in range(0, cfg.steps, cfg.burst_every):
        off = int(torch.randint(0, span + 1, (1,), generator=gen))
        e = int(torch.randint(0, E, (1,), generator=gen))
        s0 = start0 + off
        boost[s0 : s0 + cfg.burst_len, e] = np.log(cfg.burst_factor)
        bursts.append((s0, e))
    logpop = walk + boost
    counts = torch.empty(cfg.steps, E, dtype=torch.int64)
    for s0 in range(0, cfg.steps, chunk):
        lp = logpop[s0 : s0 + chunk]
        idx = sample_topk(lp, cfg.tokens, cfg.topk, gen)
        rows = lp.shape[0]
        flat = (idx + torch.arange(rows).view(-1, 1, 1) * E).reshape(-1)
        counts[s0 : s0 + rows] = torch.bincount(flat, minlength=rows * E).view(rows, E)
    return Trace(cfg, counts, logpop, bursts)


# ---------------------------------------------------------------------- EPLB baseline
def _eplb_pack(weight: np.ndarray, num_packs: int) -> np.ndarray:
    """EPLB's balanced packing: heaviest first onto the lightest pack that is not full."""
    n = weight.shape[0]
    per = n // num_packs
    pack = np.empty(n, dtype=np.int64)
    loads = [0.0] * num_packs
    fill = [0] * num_packs
    for i in np.argsort(-weight, kind="stable").tolist():
        g = min((j for j in range(num_packs) if fill[j] < per), key=lambda j: loads[j])
        pack[i] = g
        loads[g] += float(weight[i])
        fill[g] += 1
    return pack


def _eplb_flat(w: np.ndarray, num_slots: int, num_gpus: int) -> np.ndarray:
    n = w.shape[0]
    cnt = np.ones(n, dtype=np.int64)
    for _ in range(num_slots - n):  # spare slot to the largest load per replica
        cnt[int(np.argmax(w / cnt))] += 1
    key = np.repeat(np.arange(n), cnt)
    pack = _eplb_pack((w / cnt)[key], num_gpus)
    per = num_slots // num_gpus
    out = np.empty(num_slots, dtype=np.int64)
    fill = np.zeros(num_gpus, dtype=np.int64)
    for item, g in enumerate(pack.tolist()):
        out[g * per + fill[g]] = key[item]
        fill[g] += 1
    return out


def eplb_reference(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> torch.Tensor:
    """``phy2log [layers, P]`` of DeepSeek EPLB's published greedy policy (baseline only).

    Replicas to the largest load per replica, then balanced packing (heaviest
    first onto the lightest non-full pack), hierarchical (groups onto nodes
    first) when ``num_groups % num_nodes == 0``. Written from the algorithm's
    description for the comparison; no refinement, no movement awareness.
    """
    w_all = torch.as_tensor(weight).detach().to("cpu", torch.float64).numpy()
    w_all = w_all.reshape(-1, w_all.shape[-1])
    layers, E = w_all.shape
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1
    out = np.empty((layers, num_replicas), dtype=np.int64)
    gs = E // num_groups
    for layer in range(layers):
        w = w_all[layer]
        if num_nodes == 1:
            out[layer] = _eplb_flat(w, num_replicas, num_gpus)
            continue
        node_of_group = _eplb_pack(w.reshape(num_groups, gs).sum(1), num_nodes)
        spn = num_replicas // num_nodes
        for node in range(num_nodes):
            groups = np.nonzero(node_of_group == node)[0]
            experts = (groups[:, None] * gs + np.arange(gs)[None, :]).ravel()
            out[layer, node * spn : (node + 1) * spn] = experts[_eplb_flat(w[experts], spn, num_gpus // num_nodes)]
    return torch.as_tensor(out, dtype=torch.int64)


# ---------------------------------------------------------------------- simulation
def simulate(
    counts: torch.Tensor,
    num_gpus: int,
    spare_per_gpu: int,
    policy: str,
    *,
    replan_every: int = 50,
    window: int = 50,
    horizon: Optional[int] = None,
    headroom: float = 0.5,
    move_slack: float = 0.05,
    monitor_kwargs: Optional[dict] = None,
) -> Dict[str, object]:
    """Run one policy over a trace's counts ``[S, E]``; return figures and per-step loads.

    Returns a dict with ``loads`` (float64 ``[S', G]`` for the measured steps),
    the :func:`~deep_ep.balance.monitor.imbalance_figures` keys,
    ``moved_per_replan`` (mean expert copies per re-plan after the first),
    ``plan_ms`` (mean planning time) and ``replans``.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES}")
    counts = torch.as_tensor(counts).to(torch.int64)
    S, E = counts.shape
    P = E + spare_per_gpu * num_gpus
    first = window
    static = contiguous_phy2log(E, num_gpus, 0)
    if policy == "static":
        loads = gpu_loads(counts[first:], static, num_gpus)
        out = imbalance_figures(loads)
        out.update(loads=loads, moved_per_replan=0.0, plan_ms=0.0, replans=0)
        return out
    mon = LoadMonitor(E, window=window, horizon=horizon or replan_every, **(monitor_kwargs or {}))
    for t in range(first):
        mon.update(counts[t])
    prev: Optional[torch.Tensor] = None
    moved: List[int] = []
    plan_times: List[float] = []
    segments: List[torch.Tensor] = []
    t = first
    while t < S:
        end = min(t + replan_every, S)
        use_forecast = policy in ("deep_ep", "deep_ep-even")
        weight = (mon.forecast() if use_forecast else mon.window_mean()).view(1, -1)
        t0 = time.perf_counter()
        if policy in ("eplb", "eplb+steal"):
            phy2log = eplb_reference(weight, P, 1, 1, num_gpus)[0]
        else:
            phy2log = rebalance_experts(
                weight,
                P,
                1,
                1,
                num_gpus,
                headroom=headroom,
                move_slack=move_slack,
                prev_phy2log=None if prev is None else prev.view(1, -1),
            )[0][0]
        plan_times.append((time.perf_counter() - t0) * 1e3)
        if prev is not None:
            moved.append(moved_experts(prev, phy2log, num_gpus))
        prev = phy2log
        block = counts[t:end]
        if policy in ("eplb", "deep_ep-even"):
            segments.append(gpu_loads(block, phy2log, num_gpus))
        else:
            router = ReplicaRouter(phy2log, torch.bincount(phy2log, minlength=E), num_gpus)
            segments.append(torch.stack([router.gpu_load(router.quotas(ci)) for ci in block]).to(torch.float64))
        for ti in range(t, end):
            mon.update(counts[ti])
        t = end
    loads = torch.cat(segments, 0)
    out = imbalance_figures(loads)
    out.update(
        loads=loads,
        moved_per_replan=float(np.mean(moved)) if moved else 0.0,
        plan_ms=float(np.mean(plan_times)),
        replans=len(plan_times),
    )
    return out
