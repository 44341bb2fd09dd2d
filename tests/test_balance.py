"""deep_ep.balance: planner invariants, replica routing, quotas across ranks, forecast, simulation (issue 8)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

from deep_ep.balance import LoadMonitor, ReplicaRouter, gpu_loads, moved_experts, rebalance_experts, replica_counts
from deep_ep.balance.monitor import forecast_counts, imbalance_figures, per_gpu_loads
from deep_ep.balance.router import waterfill
from deep_ep.balance.simulate import TraceConfig, eplb_reference, make_trace, sample_topk, simulate
from deep_ep.errors import DeepEPInputError

README_WEIGHT = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _zipf_weight(layers, experts, seed, s=1.2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        order = torch.randperm(experts, generator=g)
        w = torch.empty(experts, dtype=torch.float64)
        w[order] = torch.arange(1, experts + 1, dtype=torch.float64).pow(-s) * 1e4
        out.append(w * torch.exp(0.3 * torch.randn(experts, dtype=torch.float64, generator=g)))
    return torch.stack(out)


def _check_plan(phy2log, log2phy, logcnt, num_experts, num_replicas, num_gpus, groups=1, nodes=1):
    layers = phy2log.shape[0]
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert phy2log.shape == (layers, num_replicas) and logcnt.shape == (layers, num_experts)
    assert log2phy.shape[:2] == (layers, num_experts) and log2phy.shape[2] == int(logcnt.max())
    assert num_replicas % num_gpus == 0  # equal slots per GPU
    for layer in range(layers):
        p = phy2log[layer]
        assert ((p >= 0) & (p < num_experts)).all()
        cnt = torch.bincount(p, minlength=num_experts)
        assert torch.equal(cnt, logcnt[layer]) and (cnt >= 1).all()  # every expert has a replica
        assert int(cnt.sum()) == num_replicas
        for e in range(num_experts):
            slots = log2phy[layer, e]
            k = int(logcnt[layer, e])
            assert (slots[k:] == -1).all() and (slots[:k] >= 0).all()
            assert torch.equal(slots[:k], torch.nonzero(p == e).squeeze(1))  # ascending, consistent
        if nodes > 1 and groups % nodes == 0:
            per_node = num_replicas // nodes
            gs = num_experts // groups
            node_of_slot = torch.arange(num_replicas) // per_node
            for grp in range(groups):
                members = (p >= grp * gs) & (p < (grp + 1) * gs)
                assert node_of_slot[members].unique().numel() == 1, f"group {grp} spans nodes"


# ---------------------------------------------------------------------------------------------- API
def test_public_names_and_docstrings():
    import deep_ep.balance as bal

    for name in bal.__all__:
        obj = getattr(bal, name)
        assert obj.__doc__ and obj.__doc__.strip(), name
    for cls in (LoadMonitor, ReplicaRouter):
        for name, member in inspect.getmembers(cls, inspect.isfunction):
            if not name.startswith("_"):
                assert member.__doc__, f"{cls.__name__}.{name}"
    assert list(inspect.signature(rebalance_experts).parameters)[:5] == [
        "weight",
        "num_replicas",
        "num_groups",
        "num_nodes",
        "num_gpus",
    ]
    assert list(inspect.signature(ReplicaRouter.route).parameters)[1:3] == ["topk_idx", "global_counts"]
    assert inspect.signature(LoadMonitor).parameters["window"].default == 100


def test_names_importable_from_their_modules():
    """Public names stay importable from the modules that first held them (and the modules stay short)."""
    import deep_ep.balance as bal
    from deep_ep.balance import migrate, migration_plan, placement, planner, simulate

    for mod, names in (
        (planner, ["rebalance_experts", "replica_counts", "moved_experts", "gpu_loads"]),
        (migrate, ["MigrationPlan", "plan_migration", "placement_moves", "migrate_experts"]),
        (simulate, ["contiguous_phy2log"]),
    ):
        for name in names:
            assert getattr(mod, name) is getattr(bal, name), f"{mod.__name__}.{name}"
    assert migrate.MigrationPlan is migration_plan.MigrationPlan and planner.gpu_loads is placement.gpu_loads
    folder = os.path.dirname(bal.__file__)
    for fname in os.listdir(folder):
        if fname.endswith(".py"):
            with open(os.path.join(folder, fname)) as f:
                assert sum(1 for _ in f) < 600, f"deep_ep/balance/{fname} is over 600 lines"


# ---------------------------------------------------------------------------------------------- planner
@pytest.mark.parametrize(
    "experts,replicas,groups,nodes,gpus",
    [
        (12, 16, 4, 2, 8),
        (12, 16, 1, 1, 8),
        (256, 320, 1, 1, 64),
        (256, 264, 8, 1, 8),
        (256, 288, 8, 2, 16),
        (64, 64, 1, 1, 8),
        (64, 96, 4, 3, 12),
        (32, 48, 8, 4, 8),
    ],
)
def test_planner_invariants(experts, replicas, groups, nodes, gpus):
    w = _zipf_weight(2, experts, seed=experts + replicas)
    for headroom in (0.0, 0.5):
        p, l2p, cnt = rebalance_experts(w, replicas, groups, nodes, gpus, headroom=headroom)
        _check_plan(p, l2p, cnt, experts, replicas, gpus, groups, nodes)
        # re-plan on drifted loads from the previous placement
        w2 = w * torch.exp(0.4 * torch.randn(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
        p2, l2p2, cnt2 = rebalance_experts(w2, replicas, groups, nodes, gpus, prev_phy2log=p, headroom=headroom)
        _check_plan(p2, l2p2, cnt2, experts, replicas, gpus, groups, nodes)


def test_replicas_on_distinct_gpus_and_spread():
    w = _zipf_weight(1, 256, seed=3)
    p, _, cnt = rebalance_experts(w, 320, 1, 1, 64)
    per_gpu = p[0].view(64, 5)
    for row in per_gpu.tolist():
        assert len(set(row)) == len(row)  # no GPU holds two replicas of one expert
    flexible = cnt[0][per_gpu] > 1
    assert flexible.any(1).all()  # every GPU holds load the router can move


def test_replica_counts_is_greedy():
    rng = np.random.default_rng(0)
    for _ in range(30):
        w = rng.random(40) ** 3
        slots = 40 + int(rng.integers(0, 60))
        cnt = np.ones(40, dtype=np.int64)
        for _ in range(slots - 40):
            cnt[int(np.argmax(w / cnt))] += 1
        assert np.array_equal(replica_counts(w, slots), cnt)
    with pytest.raises(DeepEPInputError):
        replica_counts(np.ones(4), 3)


def test_readme_example_at_least_as_good_as_eplb():
    w = torch.tensor(README_WEIGHT, dtype=torch.float64)
    p, l2p, cnt = rebalance_experts(w, 16, 4, 2, 8)
    _check_plan(p, l2p, cnt, 12, 16, 8, 4, 2)
    ours = gpu_loads(w, p, 8)
    ref = gpu_loads(w, eplb_reference(w, 16, 4, 2, 8), 8)
    ours_r = ours.max(1).values / ours.mean(1)
    ref_r = ref.max(1).values / ref.mean(1)
    assert abs(float(ref_r.max()) - 1.2422) < 1e-3  # EPLB's worst layer on its own example: 1.24
    assert float(ours_r.max()) <= float(ref_r.max()) + 1e-9
    # the load-aware split does better than any even split on the same placement
    worst = 0.0
    for layer in range(2):
        r = ReplicaRouter(p, cnt, 8, layer=layer)
        g = r.gpu_load(r.quotas(w[layer].to(torch.int64))).double()
        worst = max(worst, float(g.max() / g.mean()))
    assert worst < float(ref_r.max()) - 0.03


def test_planner_as_balanced_as_eplb():
    """Planned (even split) max/mean against EPLB's greedy. Ours never puts two replicas of one expert on a
    GPU (they add no capacity for the load-aware split), which EPLB sometimes does to fill a GPU exactly, so
    single instances may trail by a little; on average ours is at least as even."""
    ours_all, ref_all = [], []
    for seed in range(4):
        w = _zipf_weight(1, 256, seed=seed)
        for gpus, replicas in ((8, 264), (64, 320), (64, 384)):
            ours = gpu_loads(w, rebalance_experts(w, replicas, 1, 1, gpus)[0], gpus)
            ref = gpu_loads(w, eplb_reference(w, replicas, 1, 1, gpus), gpus)
            o, r = float(ours.max() / ours.mean()), float(ref.max() / ref.mean())
            assert o <= r * 1.03, (seed, gpus, replicas, o, r)
            ours_all.append(o)
            ref_all.append(r)
    assert sum(ours_all) <= sum(ref_all)


def test_replan_moves_few_experts():
    w = _zipf_weight(1, 256, seed=5)
    p, _, _ = rebalance_experts(w, 320, 1, 1, 64)
    w2 = w * torch.exp(0.2 * torch.randn(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    inc = rebalance_experts(w2, 320, 1, 1, 64, prev_phy2log=p)[0]
    fresh = rebalance_experts(w2, 320, 1, 1, 64)[0]
    assert moved_experts(p, inc, 64) < 0.5 * moved_experts(p, fresh, 64)
    assert moved_experts(p, p, 64) == 0
    gi, gf = gpu_loads(w2, inc, 64), gpu_loads(w2, fresh, 64)
    assert float(gi.max()) <= float(gf.max()) * 1.05 + 1e-9


def test_planner_input_errors():
    w = torch.ones(1, 16)
    with pytest.raises(DeepEPInputError):
        rebalance_experts(w, 18, 1, 1, 4)  # slots not a multiple of GPUs
    with pytest.raises(DeepEPInputError):
        rebalance_experts(w, 8, 1, 1, 4)  # fewer slots than experts
    with pytest.raises(DeepEPInputError):
        rebalance_experts(-w, 16, 1, 1, 4)
    p, _, cnt = rebalance_experts(torch.zeros(16), 20, 1, 1, 4)  # all-zero loads are fine
    assert (cnt >= 1).all() and p.shape == (1, 20)


# ---------------------------------------------------------------------------------------------- router
def _plan_and_routing(seed=0, experts=64, gpus=8, spare=2, tokens=512, topk=4):
    w = _zipf_weight(1, experts, seed=seed)
    p, _, cnt = rebalance_experts(w, experts + spare * gpus, 1, 1, gpus, headroom=0.5)
    g = torch.Generator().manual_seed(seed + 100)
    idx = sample_topk(torch.log(w), tokens, topk, g)[0]
    idx[torch.rand(idx.shape, generator=g) < 0.05] = -1  # some empty slots
    return p, cnt, idx


def _assert_valid_routing(router, topk_idx, out):
    assert out.shape == topk_idx.shape and out.dtype == torch.int64
    assert torch.equal(out < 0, topk_idx < 0)
    ok = topk_idx >= 0
    assert torch.equal(router.phy2log[out[ok]], topk_idx[ok])  # a replica of its own expert


def test_waterfill_levels():
    base = torch.tensor([[0, 10, 20, 0], [5, 5, 5, 5], [100, 0, 0, 0]], dtype=torch.int64)
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    counts = torch.tensor([15, 7, 50], dtype=torch.int64)
    share = waterfill(counts, base, valid)
    assert torch.equal(share.sum(1), counts) and (share >= 0).all() and (share[~valid] == 0).all()
    assert share[0].tolist() == [13, 2, 0, 0]  # level 12.5: 0+13, 10+2
    assert sorted(share[1].tolist()) == [1, 2, 2, 2]
    assert share[2].tolist() == [0, 50, 0, 0]


def test_route_each_pair_once_on_own_expert():
    p, cnt, idx = _plan_and_routing()
    r = ReplicaRouter(p, cnt, 8)
    gc = torch.bincount(idx[idx >= 0], minlength=64)
    for out in (r.route(idx), r.route(idx, gc), r.route(idx, gc.view(1, -1), rank=0)):
        _assert_valid_routing(r, idx, out)
    # with the step's counts the realised per-slot loads are exactly the quotas
    out = r.route(idx, gc.view(1, -1), rank=0)
    assert torch.equal(torch.bincount(out[out >= 0], minlength=r.num_slots), r.quotas(gc))
    # single-layer maps may be 1-D; same result
    r1 = ReplicaRouter(p[0], cnt[0], 8)
    assert torch.equal(r1.route(idx, gc), r.route(idx, gc))
    with pytest.raises(DeepEPInputError):
        r.route(torch.full((2, 2), 64, dtype=torch.int64))


def test_route_even_split_follows_plan():
    p, cnt, idx = _plan_and_routing(seed=1)
    r = ReplicaRouter(p, cnt, 8)
    out = r.route(idx)
    per_slot = torch.bincount(out[out >= 0], minlength=r.num_slots)
    n = torch.bincount(idx[idx >= 0], minlength=64)
    for e in range(64):
        slots = r.replicas[e][r.replicas[e] >= 0]
        got = per_slot[slots]
        assert int(got.sum()) == int(n[e]) and int(got.max() - got.min()) <= 1


def test_quotas_balance_and_determinism():
    p, cnt, idx = _plan_and_routing(seed=2, spare=2)
    gc = torch.bincount(idx[idx >= 0], minlength=64)
    r = ReplicaRouter(p, cnt, 8)
    q = r.quotas(gc)
    # per expert the quotas add up to the count
    per_expert = torch.zeros(64, dtype=torch.int64).scatter_add_(0, r.phy2log, q)
    assert torch.equal(per_expert, gc) and (q >= 0).all()
    # at least as balanced as the even split, and close to the fractional optimum
    even = r.gpu_load(r.even_quotas(gc)).double()
    bal = r.gpu_load(q).double()
    assert float(bal.max()) <= float(even.max())
    lower = max(float(bal.mean()), 0.0)
    rigid = torch.zeros(8, dtype=torch.float64)  # single-replica load is fixed
    for e in range(64):
        if int(cnt[0, e]) == 1:
            rigid[int(r.replicas[e, 0]) // r.slots_per_gpu] += float(gc[e])
    lower = max(lower, float(rigid.max()))
    assert float(bal.max()) <= lower * 1.02 + 8
    # same inputs -> same outputs, also from a freshly built router
    r2 = ReplicaRouter(p.clone(), cnt.clone(), 8)
    assert torch.equal(r2.quotas(gc.clone()), q) and torch.equal(r.quotas(gc), q)
    # the torch path (used on GPU) runs the same integer algorithm as the numpy CPU path
    r2._numpy_on_cpu = False
    assert torch.equal(r2.quotas(gc), q)


def test_quotas_fill_exactly_across_simulated_ranks():
    p, cnt, idx = _plan_and_routing(seed=3, tokens=1200)
    r = ReplicaRouter(p, cnt, 8)
    chunks = idx.chunk(4)  # 4 ranks with different tokens
    per_rank = torch.stack([torch.bincount(c[c >= 0], minlength=64) for c in chunks])
    outs = [r.route(c, per_rank, rank=i) for i, c in enumerate(chunks)]
    for c, o in zip(chunks, outs):
        _assert_valid_routing(r, c, o)
    allout = torch.cat(outs)
    realised = torch.bincount(allout[allout >= 0], minlength=r.num_slots)
    assert torch.equal(realised, r.quotas(per_rank.sum(0)))
    # [E] totals only: each rank splits in proportion; totals within one pair per rank of the quotas
    outs = [r.route(c, per_rank.sum(0), rank=i) for i, c in enumerate(chunks)]
    allout = torch.cat(outs)
    realised = torch.bincount(allout[allout >= 0], minlength=r.num_slots)
    assert int((realised - r.quotas(per_rank.sum(0))).abs().max()) <= 4


def test_route_issue_size():
    """65,536 pairs, 256 experts on 64 GPUs (the benchmark times this case; no timing asserted here)."""
    p, cnt, _ = _plan_and_routing(seed=4, experts=256, gpus=64, spare=1)
    g = torch.Generator().manual_seed(0)
    w = _zipf_weight(1, 256, seed=4)[0]
    idx = sample_topk(torch.log(w).view(1, -1), 8192, 8, g)[0]
    r = ReplicaRouter(p, cnt, 64)
    per_rank = torch.stack([torch.bincount(c.reshape(-1), minlength=256) for c in idx.chunk(64)])
    out = torch.cat([r.route(c, per_rank, rank=i) for i, c in enumerate(idx.chunk(64))])
    _assert_valid_routing(r, idx, out)
    assert torch.equal(torch.bincount(out.reshape(-1), minlength=r.num_slots), r.quotas(per_rank))


def _rank_route(rank, world, seed):
    p, cnt, idx = _plan_and_routing(seed=seed, tokens=600)
    r = ReplicaRouter(p, cnt, 8)
    # every rank gets different tokens
    g = torch.Generator().manual_seed(1000 + rank)
    local = idx[torch.randperm(idx.shape[0], generator=g)[: 300 + 100 * rank]]
    counts = r.exchange_counts(local)  # all_gather [R, E]
    out = r.route(local, counts)  # rank from torch.distributed
    _assert_valid_routing(r, local, out)
    q = r.quotas(counts)
    mine = torch.bincount(out[out >= 0], minlength=r.num_slots)
    total = mine.clone()
    dist.all_reduce(total)
    # [E] mode: all-reduced totals only
    tot_e = torch.bincount(local[local >= 0], minlength=64)
    dist.all_reduce(tot_e)
    out_e = r.route(local, tot_e, rank=rank)
    mine_e = torch.bincount(out_e[out_e >= 0], minlength=r.num_slots)
    dist.all_reduce(mine_e)
    mon = LoadMonitor(64, window=4, group=dist.group.WORLD)
    rec = mon.update(torch.bincount(local[local >= 0], minlength=64))
    return dict(
        q=q,
        total=total,
        counts=counts,
        q_e=r.quotas(tot_e),
        total_e=mine_e,
        rec=rec,
        tot_e=tot_e,
        imb=mon.imbalance(p, cnt, num_gpus=8, balanced=True),
    )


def test_quotas_identical_on_gloo_ranks(rank_pool):
    res = rank_pool(2).run(_rank_route, 7)
    a, b = res
    assert torch.equal(a["counts"], b["counts"]) and a["counts"].shape == (2, 64)
    assert torch.equal(a["q"], b["q"])  # same quotas on every rank
    assert torch.equal(a["total"], a["q"])  # ranks together fill them exactly
    assert torch.equal(a["q_e"], b["q_e"])
    assert int((a["total_e"] - a["q_e"]).abs().max()) <= 2
    assert torch.equal(a["rec"], a["tot_e"]) and torch.equal(b["rec"], a["tot_e"])  # monitor all-reduced
    assert a["imb"] == b["imb"] and a["imb"]["max_over_mean"] >= 1.0


# ---------------------------------------------------------------------------------------------- monitor
def test_monitor_history_window():
    mon = LoadMonitor(4, window=3)
    assert mon.history().shape == (0, 4)
    for t in range(5):
        mon.update(torch.full((4,), t, dtype=torch.int64))
    h = mon.history()
    assert h.dtype == torch.float64 and h[:, 0].tolist() == [2.0, 3.0, 4.0]
    assert mon.steps == 5 and len(mon) == 3
    assert torch.allclose(mon.window_mean(), torch.full((4,), 3.0, dtype=torch.float64))
    f = mon.forecast()
    assert f.dtype == torch.float64 and f.shape == (4,) and (f >= 0).all()
    with pytest.raises(DeepEPInputError):
        mon.update(torch.zeros(5))


def _trend_trace(steps=300, experts=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = 50 + 400 * torch.rand(experts, dtype=torch.float64, generator=g)
    slope = (torch.rand(experts, dtype=torch.float64, generator=g) - 0.5) * 0.02  # +-1% per step
    t = torch.arange(steps, dtype=torch.float64).view(-1, 1)
    rate = base * torch.exp(slope * t)
    return torch.poisson(rate, generator=g), rate


def test_forecast_beats_window_mean_on_trend():
    counts, rate = _trend_trace()
    w, horizon = 50, 25
    err_f = err_m = 0.0
    for t in range(w, counts.shape[0] - horizon, 10):
        truth = rate[t : t + horizon].mean(0)
        mon = LoadMonitor(64, window=w, horizon=horizon)
        for row in counts[t - w : t]:
            mon.update(row)
        err_f += float((mon.forecast() - truth).abs().sum() / truth.sum())
        err_m += float((mon.window_mean() - truth).abs().sum() / truth.sum())
    assert err_f < 0.5 * err_m, (err_f, err_m)


def test_forecast_beats_window_mean_on_drifting_trace():
    tr = make_trace(TraceConfig(num_experts=64, topk=4, tokens=1024, steps=260, seed=3))
    c = tr.counts.to(torch.float64)
    err_f = err_m = 0.0
    for t in range(50, 210, 10):
        truth = c[t : t + 50].mean(0)
        err_f += float((forecast_counts(c[t - 50 : t], 50) - truth).abs().sum() / truth.sum())
        err_m += float((c[t - 50 : t].mean(0) - truth).abs().sum() / truth.sum())
    assert err_f < err_m, (err_f, err_m)


def test_imbalance_figures():
    mon = LoadMonitor(4, window=10)
    mon.update(torch.tensor([3, 1, 2, 2]))  # contiguous on 2 GPUs: 4 and 4
    mon.update(torch.tensor([6, 0, 1, 1]))  # 6 and 2
    fig = mon.imbalance(num_gpus=2)
    assert fig["steps"] == 2
    assert fig["max_over_mean"] == pytest.approx((1.0 + 1.5) / 2)
    assert fig["std_over_mean"] == pytest.approx((0.0 + 0.5) / 2)
    # expert 0 replicated on both GPUs: even split evens the second step out completely
    p = torch.tensor([0, 1, 2, 0, 3, 3])  # 3 slots per GPU
    cnt = torch.bincount(p, minlength=4)
    fig2 = mon.imbalance(p, cnt, num_gpus=2, counts=torch.tensor([6, 0, 1, 1]))
    assert fig2["max_over_mean"] == pytest.approx(1.0)
    fig3 = mon.imbalance(p, cnt, num_gpus=2, counts=torch.tensor([6, 4, 1, 1]), balanced=True)
    assert fig3["max_over_mean"] == pytest.approx(1.0)
    assert imbalance_figures(torch.tensor([[1.0, 3.0]]))["max_over_mean"] == pytest.approx(1.5)
    assert per_gpu_loads(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), 2).tolist() == [[3.0, 7.0]]
    with pytest.raises(DeepEPInputError):
        LoadMonitor(4).imbalance()  # no group, no num_gpus


# ---------------------------------------------------------------------------------------------- simulation
def test_sample_topk_distinct_and_unbiased():
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(1, 16, dtype=torch.float64, generator=g) * 1.5
    x = sample_topk(lp, 20000, 4, g)[0]
    s = x.sort(1).values
    assert not (s[:, 1:] == s[:, :-1]).any() and x.min() >= 0 and x.max() < 16
    y = torch.multinomial(
        torch.softmax(lp, 1).expand(20000, 16), 4, replacement=False, generator=torch.Generator().manual_seed(1)
    )
    for k in range(4):  # successive-sampling marginals per position
        a = torch.bincount(x[:, k], minlength=16).double() / 20000
        b = torch.bincount(y[:, k], minlength=16).double() / 20000
        assert float((a - b).abs().max()) < 0.02


def test_simulation_small_deep_ep_beats_eplb():
    tr = make_trace(TraceConfig(num_experts=64, topk=4, tokens=2048, steps=200, seed=1))
    assert tr.counts.shape == (200, 64) and int(tr.counts[0].sum()) == 2048 * 4
    assert len(tr.bursts) == 2
    res = {pol: simulate(tr.counts, 8, 1, pol) for pol in ("static", "eplb", "deep_ep", "eplb+steal")}
    for r in res.values():
        assert r["steps"] == 150 and r["max_over_mean"] >= 1.0
    assert res["deep_ep"]["max_over_mean"] < res["eplb"]["max_over_mean"] < res["static"]["max_over_mean"]
    assert res["deep_ep"]["std_over_mean"] < res["eplb"]["std_over_mean"]
    assert res["eplb+steal"]["max_over_mean"] <= res["eplb"]["max_over_mean"]
    assert res["deep_ep"]["moved_per_replan"] < res["eplb"]["moved_per_replan"]


def test_benchmark_script_small(tmp_path):
    out = tmp_path / "balance.json"
    cmd = [
        sys.executable,
        os.path.join(REPO, "benchmarks", "bench_balance.py"),
        "--steps",
        "120",
        "--tokens",
        "512",
        "--gpus",
        "8",
        "--spare",
        "1",
        "--policies",
        "static,eplb,deep_ep",
        "--timing-iters",
        "2",
        "--seeds",
        "0,1",
        "--timing-tokens",
        "1024",
        "--json",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
    data = json.loads(out.read_text())
    assert data["workload"] == "balance" and data["card"] == "cpu"
    ops = {(r["op"], r["backend"]) for r in data["rows"]}
    assert ("balance", "deep_ep") in ops and ("route", "deep_ep") in ops and ("plan", "deep_ep") in ops
    assert "gpus8_spare1" in data["done_when"]


@pytest.mark.slow
def test_simulation_issue_sizes():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: one thread is several times faster on a busy 2-core box
    try:
        tr = make_trace(TraceConfig(steps=400, tokens=8192, seed=1))
    finally:
        torch.set_num_threads(threads)
    for gpus in (8, 64):
        e = simulate(tr.counts, gpus, 1, "eplb")
        d = simulate(tr.counts, gpus, 1, "deep_ep")
        assert d["max_over_mean"] - 1 <= 0.75 * (e["max_over_mean"] - 1)
