"""BalancedDispatch (deep_ep.balance.balanced): a tiny MoE layer with replicas and re-plans against the oracle.

Every rank builds the inputs of all ranks from one seed, so it can run the
single-process oracle (:mod:`deep_ep.reference`, logical expert ids, no
replicas) for itself. The layer: ``out[t] = sum_k w[t, k] * tanh(x[t] @ W[e_k])``
with the expert sum done by combine.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from deep_ep import ops
from deep_ep import reference as ref
from deep_ep.balance import BalancedDispatch, ReplicaRouter, rebalance_experts
from deep_ep.errors import DeepEPInputError, RemoteInputError
from tests._cases import device, get_buffer

H = 8  # hidden size
K = 2  # top-k


def zipf_logpop(g: torch.Generator, num_experts: int, s: float = 1.2) -> torch.Tensor:
    """Log-popularity of a Zipf(s) law over a random expert order."""
    order = torch.randperm(num_experts, generator=g)
    lp = torch.empty(num_experts, dtype=torch.float64)
    lp[order] = -s * torch.log(torch.arange(1, num_experts + 1, dtype=torch.float64))
    return lp


def make_step(seed: int, R: int, E: int, tokens=None, neg: bool = True):
    """Inputs of every rank for one step: x (float64), skewed top-K routing (a few -1), gate weights, and the
    target ``tanh(x @ teacher)`` of a fixed teacher."""
    g = torch.Generator().manual_seed(seed)
    lp = zipf_logpop(torch.Generator().manual_seed(1234), E)  # the same popularity every step
    teacher = torch.randn((H, H), generator=torch.Generator().manual_seed(4321), dtype=torch.float64)
    tokens = tokens or [int(torch.randint(6, 30, (1,), generator=g)) for _ in range(R)]
    xs, idx, ws, tg = [], [], [], []
    for t in tokens:
        scores = lp + 3.0 * torch.rand((t, E), generator=g, dtype=torch.float64)
        top = scores.topk(K, dim=1)
        ti = top.indices
        if neg:
            ti = ti.masked_fill(torch.rand((t, K), generator=g) < 0.1, -1)
        xs.append(torch.randn((t, H), generator=g, dtype=torch.float64))
        idx.append(ti)
        ws.append(torch.softmax(top.values, dim=1).float())
        tg.append(torch.tanh(xs[-1] @ teacher))
    return xs, idx, ws, tg


def experts(recv_x, recv_idx, recv_w, W):
    """``sum_k w_k * tanh(x @ W[slot_k])`` over this rank's slots (``recv_idx`` local, -1 = not here)."""
    y = torch.zeros(recv_x.shape, dtype=W.dtype, device=recv_x.device)
    for k in range(recv_idx.size(1)):
        for s in range(W.size(0)):  # also with no rows: y then still depends on W (autograd on every rank)
            rows = torch.nonzero(recv_idx[:, k] == s).flatten()
            y = y.index_add(0, rows, recv_w[rows, k : k + 1].to(W.dtype) * torch.tanh(recv_x[rows].to(W.dtype) @ W[s]))
    return y


def oracle(xs, idx, ws, W_table, E):
    """The layer on all ranks at once in plain torch (logical experts, contiguous, no replicas)."""
    R = len(xs)
    L = E // R
    exp = ref.dispatch(xs, idx, E, ws)
    ys = [
        experts(d.recv_x, d.recv_topk_idx, d.recv_topk_weights, W_table[r * L : (r + 1) * L]) for r, d in enumerate(exp)
    ]
    return [o for o, _ in ref.combine(ys, exp, [x.size(0) for x in xs])]


# ------------------------------------------------------------------------------------------------ forward


def rank_layer_output(rank, R, seed, host_quotas=True):
    dev = device()
    buf = get_buffer()
    E = 2 * R
    g = torch.Generator().manual_seed(seed)
    W_table = torch.randn((E, H, H), generator=g, dtype=torch.float64) * 0.5
    # a planned placement with one spare slot per rank: the hot experts get replicas on other ranks
    popularity = torch.exp(zipf_logpop(torch.Generator().manual_seed(1234), E)).view(1, -1)
    p2l = rebalance_experts(popularity, E + R, 1, 1, R)[0][0]
    bd = BalancedDispatch(buf, E, phy2log=p2l, host_quotas=host_quotas)
    assert bd.num_slots == E + R and bd.slots_per_rank == (E + R) // R
    assert (torch.bincount(p2l, minlength=E) > 1).any(), "the test wants replicas"
    W = W_table[bd.local_experts].to(dev)
    routed = 0
    for step in range(3):
        xs, idx, ws, _ = make_step(seed + step, R, E)
        expected = oracle(xs, idx, ws, W_table, E)[rank]
        x, ti, w = xs[rank].to(dev), idx[rank].to(dev), ws[rank].to(dev)

        # plain (no autograd) path: Buffer.get_dispatch_layout + Buffer.dispatch with physical ids
        recv_x, recv_idx, recv_w, per_slot, handle, _ = bd.dispatch(x, ti, w)
        assert recv_idx.max() < bd.slots_per_rank and len(per_slot) == bd.slots_per_rank
        assert sum(per_slot) == int((recv_idx >= 0).sum())
        out, _, _ = bd.combine(experts(recv_x, recv_idx, recv_w, W), handle)
        torch.testing.assert_close(out.cpu(), expected, atol=1e-12, rtol=1e-12)
        routed += sum(per_slot)

        # the router used this step's global counts: every rank's load is what the quotas say, give or
        # take one pair per rank and replica (the [E] counts are split proportionally on each rank)
        gc = bd.monitor.history()[-1].to(torch.int64)
        loads = torch.tensor([sum(per_slot)], dtype=torch.int64, device=dev)
        all_loads = [torch.zeros_like(loads) for _ in range(R)]
        dist.all_gather(all_loads, loads)
        want = bd.router.gpu_load(bd.router.quotas(gc)).cpu()
        assert int(torch.cat(all_loads).sum()) == int(gc.sum())
        assert (torch.cat(all_loads).cpu() - want).abs().max() <= R * int(bd.router.logcnt.max())

        # differentiable path (deep_ep.ops): same output, and the input gradient of the oracle's autograd
        xg = x.clone().requires_grad_()
        recv_x, recv_idx, recv_w, _, handle, ev = bd.dispatch(xg, ti, w)
        assert ev is None and recv_x.requires_grad
        out, _, _ = bd.combine(experts(recv_x, recv_idx, recv_w, W), handle)
        torch.testing.assert_close(out.detach().cpu(), expected, atol=1e-12, rtol=1e-12)
        G = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 99 + rank), dtype=out.dtype)
        (out * G.to(dev)).sum().backward()
        # out_r depends on rank r's tokens only, so d(sum_r out_r . G_r) / dx_rank is this rank's term
        xr = [t.clone().requires_grad_() for t in xs]
        (oracle(xr, idx, ws, W_table, E)[rank] * G).sum().backward()
        torch.testing.assert_close(xg.grad.cpu(), xr[rank].grad, atol=1e-12, rtol=1e-12)

        # a re-plan between steps moves the weights (in place) to the new placement
        bd.maybe_replan(1, [W])
        assert torch.equal(W.cpu(), W_table[bd.local_experts]), "migrated weights"
    assert bd.steps == 6 and routed > 0
    return bd.replans


@pytest.mark.parametrize("R", [2, 4])
def test_balanced_layer_equals_oracle(rank_pool, R):
    replans = rank_pool(R).run(rank_layer_output, 40 + R)
    assert len(set(replans)) == 1 and replans[0] >= 1, replans


# ------------------------------------------------------------------------------------------------ training


def _train(rank, R, seed, steps, balanced, every):
    """fp32 expert weights trained with Adam; the layer runs in float64 and the loss and gradients are rounded
    to fp32 once, so the fp32 numbers do not depend on where an expert's tokens were computed."""
    dev = device()
    buf = get_buffer()
    E = 2 * R
    L = E // R
    W_table = torch.randn((E, H, H), generator=torch.Generator().manual_seed(seed)) * 0.5  # float32
    if balanced:
        bd = BalancedDispatch(buf, E, num_slots=E + R, window=every)  # contiguous start, 1 spare slot per rank
        W = torch.nn.Parameter(W_table[bd.local_experts].to(dev))
    else:
        W = torch.nn.Parameter(W_table[rank * L : (rank + 1) * L].to(dev))
    opt = torch.optim.Adam([W], lr=2e-2)
    losses, moves = [], []
    for t in range(steps):
        xs, idx, ws, tg = make_step(seed + 10 + t % 2, R, E, neg=False)  # two batches in turn
        x, ti, w, target = xs[rank].to(dev), idx[rank].to(dev), ws[rank].to(dev), tg[rank].to(dev)
        W64 = W.detach().double().requires_grad_()
        if balanced:
            recv_x, recv_idx, recv_w, _, handle, _ = bd.dispatch(x, ti, w)
            out = bd.combine(experts(recv_x, recv_idx, recv_w, W64), handle)[0]
        else:
            recv_x, recv_idx, recv_w, _, handle = ops.dispatch(buf, x, ti, w, num_experts=E)
            out = ops.combine(buf, experts(recv_x, recv_idx, recv_w, W64), handle)[0]
        loss = ((out - target) ** 2).sum() / (sum(a.size(0) for a in xs) * H)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.float().cpu())
        if balanced:
            bd.sum_replica_grads([W], [W64.grad])  # replicas: the expert's gradient, summed in float64
        else:
            W.grad = W64.grad.float()  # one slot per expert: its gradient is complete here
        opt.step()
        opt.zero_grad()
        if balanced and bd.maybe_replan(every, [W], opt):
            moves.append(bd.last_moves)
    # every logical expert's final weights, from the rank of its first slot (exact all-reduce of one term)
    p2l = bd.phy2log if balanced else torch.arange(E)
    S = p2l.numel() // R
    table = torch.zeros((E, H, H), dtype=torch.float32, device=dev)
    first = {}
    for p, e in enumerate(p2l.tolist()):
        first.setdefault(e, p)
    for e, p in first.items():
        if p // S == rank:
            table[e] = W.detach()[p - rank * S]
    dist.all_reduce(table)
    assert torch.equal(W.detach(), table[p2l[rank * S : (rank + 1) * S].to(dev)]), "replicas diverged"
    return torch.stack(losses), table.cpu(), moves


def rank_training(rank, R, seed):
    steps, every = 7, 3
    loss_u, w_u, _ = _train(rank, R, seed, steps, False, every)
    loss_b, w_b, moves = _train(rank, R, seed, steps, True, every)
    assert moves and max(moves) > 0, "the skewed routing should make the planner move experts"
    assert torch.equal(loss_u, loss_b), f"fp32 losses differ: {loss_u.tolist()} vs {loss_b.tolist()}"
    assert torch.equal(w_u, w_b), "final expert weights differ"
    assert loss_u[-1] < loss_u[0], "the layer should learn"  # steps 0 and 6: the same batch
    return loss_b.tolist(), moves


@pytest.mark.parametrize("R", [2, 4])
def test_training_across_replans_matches_unbalanced(rank_pool, R):
    out = rank_pool(R).run(rank_training, 70 + R)
    assert all(o == out[0] for o in out)


def test_route_with_precomputed_quotas():
    """``route(..., quotas=router.quotas(counts))`` (what BalancedDispatch does with host quotas) routes alike."""
    g = torch.Generator().manual_seed(3)
    E, R = 16, 4
    p2l, _, cnt = rebalance_experts(torch.exp(zipf_logpop(g, E)).view(1, -1) * 100, E + R, 1, 1, R)
    router = ReplicaRouter(p2l, cnt, R)
    ti = torch.multinomial(torch.exp(zipf_logpop(g, E)), 2 * 50, replacement=True, generator=g).view(50, 2)
    gc = torch.bincount(ti.reshape(-1), minlength=E) * R
    for rank in range(R):
        want = router.route(ti, gc, rank=rank)
        assert torch.equal(router.route(ti, gc, rank=rank, quotas=router.quotas(gc)), want)
    per_rank = torch.stack([gc // R] * R)
    assert torch.equal(router.route(ti, per_rank, rank=1, quotas=router.quotas(gc)), router.route(ti, per_rank, rank=1))
    with pytest.raises(DeepEPInputError, match="quotas"):
        router.route(ti, gc, rank=0, quotas=torch.zeros(3, dtype=torch.int64))


# ------------------------------------------------------------------------------------------------ errors


def rank_errors(rank, R):
    dev = device()
    buf = get_buffer()
    E = 2 * R
    with pytest.raises(DeepEPInputError, match="multiple"):
        BalancedDispatch(buf, E, num_slots=E + 1)
    with pytest.raises(DeepEPInputError, match="without a replica"):
        BalancedDispatch(buf, E, phy2log=torch.zeros(E, dtype=torch.int64))
    with pytest.raises(DeepEPInputError, match="num_slots"):
        BalancedDispatch(buf, E, num_slots=E + R, phy2log=torch.arange(E))
    bd = BalancedDispatch(buf, E, num_slots=E + R, load_aware=False)
    assert torch.equal(bd.phy2log[: E // R], torch.arange(E // R)), "contiguous start"
    W = torch.zeros((bd.slots_per_rank, 3), device=dev)
    with pytest.raises(DeepEPInputError, match="every"):
        bd.maybe_replan(0, [W])
    assert not bd.maybe_replan(5, [W]), "nothing recorded yet"
    x = torch.randn((4, H), dtype=torch.float64, device=dev)
    ti = torch.tensor([[0, 1], [2, -1], [E - 1, 0], [-1, -1]], device=dev)
    if dev.type == "cpu":  # CUDA skips the host check (the Buffer rejects the invalid slot instead)
        bad = ti.clone()
        if rank == R - 1:
            bad[1, 1] = E
        err = DeepEPInputError if rank == R - 1 else RemoteInputError
        with pytest.raises(err, match=rf"outside \[-1, {E}\)"):
            bd.dispatch(x, bad)
        assert bd.steps == 0 and len(bd.monitor) == 0, "a rejected step is not recorded"
    ones = torch.ones(ti.shape, dtype=torch.float32, device=dev)
    recv_x, recv_idx, recv_w, per_slot, handle, _ = bd.dispatch(x, ti, ones)
    out, _, _ = bd.combine(recv_x * recv_w.sum(1, keepdim=True).to(x.dtype), handle)  # every pair once
    torch.testing.assert_close(out, x * (ti >= 0).sum(1, keepdim=True), atol=0, rtol=0)
    assert bd.steps == 1 and bd.monitor.history().shape == (1, E)
    fig = bd.imbalance()
    assert fig["steps"] == 1 and fig["max_over_mean"] >= 1.0
    return True


@pytest.mark.parametrize("R", [2, 3])
def test_balanced_dispatch_errors(rank_pool, R):
    assert all(rank_pool(R).run(rank_errors))


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_balanced_layer_gpu(rank_pool):
    pool = rank_pool(2, backend="nccl")
    pool.run(rank_layer_output, 5)
    pool.run(rank_layer_output, 5, False)  # quotas solved on the GPU
    pool.run(rank_training, 6)
    pool.run(rank_errors)


# ------------------------------------------------------------------------------------------------ benchmark


def rank_layer_benchmark(rank, R, json_path):
    """``run`` of ``benchmarks/bench_balance_layer.py --small`` on the pool's gloo group (what torchrun runs)."""
    import importlib.util
    import os

    path = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_balance_layer.py"
    )
    spec = importlib.util.spec_from_file_location("bench_balance_layer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.run(mod.parse_args(["--small", "--quiet", "--json", json_path]))["speedup"]


def test_layer_benchmark_small(rank_pool, tmp_path):
    """The layer benchmark's small CPU run writes its result file (``torchrun --nproc-per-node 2
    benchmarks/bench_balance_layer.py --small --json PATH`` runs the same ``run`` after its own init)."""
    import json

    out = tmp_path / "layer.json"
    speedups = rank_pool(2).run(rank_layer_benchmark, str(out))
    assert speedups[0] == speedups[1]
    data = json.loads(out.read_text())
    assert data["workload"] == "balance-layer" and data["card"] == "cpu" and data["num_ranks"] == 2
    kinds = {(r["backend"], r["impl"]) for r in data["rows"]}
    assert kinds == {(b, i) for b in ("static", "deep_ep-balanced") for i in ("grouped", "padded")}
    assert all(r["time_us"] > 0 and r["samples"] == 5 for r in data["rows"])
    assert data["outputs_max_rel_diff"] < 1e-4, "both policies compute the same layer"
    bal = [r for r in data["rows"] if r["backend"] == "deep_ep-balanced"]
    static = [r for r in data["rows"] if r["backend"] == "static"]
    assert bal[0]["pairs_max_over_mean"] < static[0]["pairs_max_over_mean"], "balancing evens the pairs per rank"
