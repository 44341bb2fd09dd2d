"""Expert weight migration (deep_ep.balance.migrate): bit-exact moves, optimizer state, training continuity, errors.

Every rank builds the global per-expert tables from one seed, so it can
check its own slots after a migration without further communication.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from deep_ep.balance.migrate import MigrationPlan, migrate_experts, placement_moves, plan_migration
from deep_ep.balance.planner import moved_experts
from deep_ep.errors import DeepEPInputError, DeepEPTypeError, RankMismatchError, RemoteInputError

# ------------------------------------------------------------------------------------------------ helpers


def rand_placement(g: torch.Generator, num_experts: int, num_slots: int) -> torch.Tensor:
    """Every expert at least once, the spare slots random replicas, shuffled."""
    extra = torch.randint(0, num_experts, (num_slots - num_experts,), generator=g)
    p = torch.cat([torch.arange(num_experts), extra])
    return p[torch.randperm(num_slots, generator=g)]


def rand_bits(g: torch.Generator, shape, dtype: torch.dtype) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (NaN payloads, infs, denormals included for floats)."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    n = 1
    for d in shape:
        n *= d
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), generator=g, dtype=torch.int64).to(torch.uint8)
    return raw.view(dtype).view(shape) if n else torch.empty(shape, dtype=dtype)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bytes."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach().contiguous().reshape(-1), b.detach().contiguous().reshape(-1)
    if a.dtype != torch.uint8:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def local_rows(table: torch.Tensor, phy2log: torch.Tensor, rank: int, R: int) -> torch.Tensor:
    """This rank's slots of ``phy2log`` ([P] or [layers, P]) gathered from ``table`` ([E, ...] or [layers, E, ...])."""
    S = phy2log.shape[-1] // R
    mine = phy2log[..., rank * S : (rank + 1) * S]
    if phy2log.dim() == 1:
        return table[mine].clone()
    return table[torch.arange(phy2log.shape[0]).unsqueeze(1), mine].clone()


def brute_moves(old: torch.Tensor, new: torch.Tensor, R: int) -> int:
    """Per layer and rank: experts the rank needs in ``new`` that it did not hold in ``old``."""
    old, new = old.reshape(-1, old.shape[-1]), new.reshape(-1, new.shape[-1])
    so, sn = old.shape[1] // R, new.shape[1] // R
    return sum(
        len(set(new[l, d * sn : (d + 1) * sn].tolist()) - set(old[l, d * so : (d + 1) * so].tolist()))
        for l in range(old.shape[0])
        for d in range(R)
    )


SPECS = {
    "w": ((3, 5), torch.float32),
    "b": ((4,), torch.bfloat16),
    "i": ((2,), torch.int64),
    "q": ((8,), torch.float8_e4m3fn),
    "m": ((3,), torch.bool),
    "z": ((0,), torch.float32),
    "d": ((2, 2), torch.float64),
}


# ------------------------------------------------------------------------------------------------ (1) weights


def rank_random_migration(rank, R, seed, layered, bucket_bytes):
    g = torch.Generator().manual_seed(seed)
    E = 3 * R - 1
    layers = 2 if layered else 1
    P_old, P_new = 4 * R, (5 * R if seed % 2 else 3 * R)
    old = torch.stack([rand_placement(g, E, P_old) for _ in range(layers)])
    new = torch.stack([rand_placement(g, E, P_new) for _ in range(layers)])
    if not layered:
        old, new = old[0], new[0]
    lead = (layers, E) if layered else (E,)
    tables = {k: rand_bits(g, lead + shape, dt) for k, (shape, dt) in SPECS.items()}

    local = {k: local_rows(t, old, rank, R) for k, t in tables.items()}
    before = {k: v.clone() for k, v in local.items()}
    out = migrate_experts(local, old, new, bucket_bytes=bucket_bytes)
    assert isinstance(out, dict) and list(out) == list(SPECS)
    for k, t in tables.items():
        exp = local_rows(t, new, rank, R)
        assert bits_equal(out[k], exp), f"{k}: rank {rank} slots differ after migration"
        assert bits_equal(local[k], before[k]), f"{k}: input modified without inplace"

    # A list and a single tensor come back in the same form.
    keys = ["w", "q"]
    out_l = migrate_experts([local[k] for k in keys], old, new, bucket_bytes=bucket_bytes)
    assert isinstance(out_l, list) and all(bits_equal(o, out[k]) for o, k in zip(out_l, keys))
    out_t = migrate_experts(local["b"], old, new)
    assert isinstance(out_t, torch.Tensor) and bits_equal(out_t, out["b"])
    # Parameters come back as new Parameters with the same requires_grad.
    prm = torch.nn.Parameter(local["w"].clone())
    out_p = migrate_experts((prm,), old, new)
    assert isinstance(out_p, tuple) and isinstance(out_p[0], torch.nn.Parameter) and out_p[0].requires_grad
    assert bits_equal(out_p[0].data, out["w"])

    # The move count is what must cross ranks, and the same on every rank.
    n = placement_moves(old, new, R)
    assert n == brute_moves(old, new, R) == plan_migration(old, new, R).send_counts().sum()
    if P_old == P_new:  # the planner's count assumes one slot count
        assert n <= moved_experts(old, new, R)
    assert placement_moves(old, old, R) == 0
    return n


@pytest.mark.parametrize(
    "R,seed,layered,bucket", [(2, 1, False, 1 << 28), (2, 2, True, 1), (4, 3, False, 64), (4, 4, True, 1 << 28)]
)
def test_migrate_random_placements(rank_pool, R, seed, layered, bucket):
    moves = rank_pool(R).run(rank_random_migration, seed, layered, bucket)
    assert len(set(moves)) == 1 and moves[0] > 0


# ------------------------------------------------------------------------------------------------ (2) optimizer


def rank_optimizer_state(rank, R, seed):
    g = torch.Generator().manual_seed(seed)
    E = 2 * R
    old, new = rand_placement(g, E, 3 * R), rand_placement(g, E, 3 * R)
    w, m, v, vmax, gr = (torch.randn((E, 4, 8), generator=g) for _ in range(5))
    bw, bm, bv, bg = (torch.randn((E, 8), generator=g).to(torch.float64) for _ in range(4))

    def build(phy):
        p = torch.nn.Parameter(local_rows(w, phy, rank, R))
        b = torch.nn.Parameter(local_rows(bw, phy, rank, R))
        p.grad, b.grad = local_rows(gr, phy, rank, R), local_rows(bg, phy, rank, R)
        opt = torch.optim.Adam([p, b], lr=1e-2, amsgrad=True)
        opt.state[p] = {
            "step": torch.tensor(7.0),
            "exp_avg": local_rows(m, phy, rank, R),
            "exp_avg_sq": local_rows(v, phy, rank, R).abs(),
            "max_exp_avg_sq": local_rows(vmax, phy, rank, R).abs() + 1,
        }
        opt.state[b] = {
            "step": torch.tensor(7.0),
            "exp_avg": local_rows(bm, phy, rank, R),
            "exp_avg_sq": local_rows(bv, phy, rank, R).abs(),
            "max_exp_avg_sq": local_rows(bv, phy, rank, R).abs() + 1,
        }
        return p, b, opt

    p, b, opt = build(old)
    step_obj = opt.state[p]["step"]
    res = migrate_experts({"w": p, "b": b}, old, new, optimizer=opt)
    assert res["w"] is p and res["b"] is b, "in place: the parameter objects stay"
    rp, rb, ropt = build(new)  # what a run that started on the new placement holds
    for mine, ref in ((p, rp), (b, rb)):
        assert bits_equal(mine.data, ref.data) and bits_equal(mine.grad, ref.grad)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert bits_equal(opt.state[mine][key], ropt.state[ref][key]), key
        assert bits_equal(opt.state[mine]["step"], torch.tensor(7.0))
    assert opt.state[p]["step"] is step_obj, "scalar state is kept"
    assert opt.param_groups[0]["params"][0] is p
    opt.step()
    ropt.step()
    assert bits_equal(p.data, rp.data) and bits_equal(b.data, rb.data), "Adam step after migration"
    assert bits_equal(opt.state[p]["exp_avg_sq"], ropt.state[rp]["exp_avg_sq"])

    # SGD with momentum: momentum_buffer moves, too.
    q = torch.nn.Parameter(local_rows(w, old, rank, R))
    sgd = torch.optim.SGD([q], lr=0.1, momentum=0.9)
    sgd.state[q] = {"momentum_buffer": local_rows(m, old, rank, R)}
    migrate_experts([q], old, new, optimizer=sgd)
    assert bits_equal(q.data, local_rows(w, new, rank, R))
    assert bits_equal(sgd.state[q]["momentum_buffer"], local_rows(m, new, rank, R))
    return placement_moves(old, new, R)


@pytest.mark.parametrize("R", [2, 4])
def test_migrate_optimizer_state(rank_pool, R):
    rank_pool(R).run(rank_optimizer_state, 10 + R)


# ------------------------------------------------------------------------------------------------ (3) training

D_IN, D_HID = 8, 16  # 8 * 16 fp32 = 512 bytes per slot: every slot 64-byte aligned and a whole
# number of SIMD vectors, so an expert's arithmetic does not depend on its slot


def _train(rank, R, W1, W2, opt, phy2log, steps, data, losses):
    """Expert-parallel steps: each expert's loss on the rank of its first replica; replicas share grads.

    Per step: the rank holding the lowest slot of expert ``e`` computes
    ``loss_e`` on ``e``'s fixed tokens; the per-expert losses are all-reduced
    into an ``[E]`` vector (one non-zero contributor per entry, so exact) and
    summed in expert order. Gradients of the computed experts are all-reduced
    in an ``[E, ...]`` table (again one contributor per entry) and every
    replica takes its expert's gradient, so replicas stay identical under Adam.
    Nothing depends on where an expert lives: the loss is bitwise independent
    of the placement.
    """
    E = len(data)
    S = phy2log.numel() // R
    first = {}
    for p, e in enumerate(phy2log.tolist()):
        first.setdefault(e, p)
    mine = [(e, first[e] - rank * S) for e in range(E) if first[e] // S == rank]
    local_log = phy2log[rank * S : (rank + 1) * S]
    for _ in range(steps):
        opt.zero_grad(set_to_none=False)
        vec = torch.zeros(E, dtype=torch.float32)
        terms = []
        for e, s in mine:
            x, y = data[e]
            loss_e = ((torch.tanh(x @ W1[s]) @ W2[s] - y) ** 2).mean()
            terms.append(loss_e)
            vec[e] = loss_e.detach()
        if terms:
            torch.stack(terms).sum().backward()
        dist.all_reduce(vec)
        losses.append(vec.sum())
        for prm in (W1, W2):
            table = torch.zeros((E,) + tuple(prm.shape[1:]), dtype=prm.dtype)
            for e, s in mine:
                table[e] = prm.grad[s]
            dist.all_reduce(table)
            prm.grad = table[local_log]  # also where this rank computed no expert
        opt.step()


def _global_table(rank, R, prm, phy2log):
    """``[E, ...]``: every expert's weights from its first replica (exact all-reduce); checks replicas agree."""
    E = int(phy2log.max()) + 1
    S = phy2log.numel() // R
    table = torch.zeros((E,) + tuple(prm.shape[1:]), dtype=prm.dtype)
    seen = set()
    for p, e in enumerate(phy2log.tolist()):
        if e not in seen:
            seen.add(e)
            if p // S == rank:
                table[e] = prm.data[p - rank * S]
    dist.all_reduce(table)
    local = phy2log[rank * S : (rank + 1) * S]
    assert bits_equal(prm.data, table[local]), "replicas of one expert diverged"
    return table


def rank_training(rank, R, seed):
    g = torch.Generator().manual_seed(seed)
    E = 2 * R
    P = 3 * R  # R spare slots: replicas
    old = rand_placement(g, E, P)
    new = rand_placement(g, E, P)
    while brute_moves(old, new, R) < R:  # make sure experts really change ranks
        new = rand_placement(g, E, P)
    W1_t = torch.randn((E, D_IN, D_HID), generator=g) * 0.3
    W2_t = torch.randn((E, D_HID, D_IN), generator=g) * 0.3
    data = []
    for e in range(E):
        n = 5 + e
        data.append((torch.randn((n, D_IN), generator=g), torch.randn((n, D_IN), generator=g)))

    def model(phy):
        W1 = torch.nn.Parameter(local_rows(W1_t, phy, rank, R))
        W2 = torch.nn.Parameter(local_rows(W2_t, phy, rank, R))
        return W1, W2, torch.optim.Adam([W1, W2], lr=1e-2)

    # Run A: never moves.
    W1, W2, opt = model(old)
    loss_a = []
    _train(rank, R, W1, W2, opt, old, 6, data, loss_a)
    final_a = [_global_table(rank, R, W1, old), _global_table(rank, R, W2, old)]

    # Run B: 3 steps, migrate (weights + Adam state + grads), 3 steps on the new placement.
    V1, V2, opt_b = model(old)
    loss_b = []
    _train(rank, R, V1, V2, opt_b, old, 3, data, loss_b)
    out = migrate_experts({"w1": V1, "w2": V2}, old, new, optimizer=opt_b)
    assert out["w1"] is V1 and out["w2"] is V2
    _train(rank, R, V1, V2, opt_b, new, 3, data, loss_b)
    final_b = [_global_table(rank, R, V1, new), _global_table(rank, R, V2, new)]

    la, lb = torch.stack(loss_a), torch.stack(loss_b)
    assert bits_equal(la, lb), f"loss sequences differ: {la.tolist()} vs {lb.tolist()}"
    assert la[-1] < la[0], "the toy model should learn"
    for a, b in zip(final_a, final_b):
        assert bits_equal(a, b), "final expert weights differ"
    return la.tolist()


@pytest.mark.parametrize("R", [2, 4])
def test_training_continues_across_migration(rank_pool, R):
    losses = rank_pool(R).run(rank_training, 100 + R)
    assert all(l == losses[0] for l in losses)


# ------------------------------------------------------------------------------------------------ (4) errors


def rank_errors(rank, R):
    g = torch.Generator().manual_seed(5)
    E = 2 * R
    old, new = rand_placement(g, E, 3 * R), rand_placement(g, E, 3 * R)
    table = torch.randn((E, 4), generator=g)
    good = local_rows(table, old, rank, R)

    # A bad tensor on rank 1 only: its own precise error there, RemoteInputError naming it elsewhere.
    mine = good[:-1] if rank == 1 else good
    if rank == 1:
        with pytest.raises(DeepEPInputError, match=r"expected \[slots_per_rank, \.\.\.\] with leading dims \(3,\)"):
            migrate_experts({"w": mine}, old, new)
    else:
        with pytest.raises(RemoteInputError, match=r"rank\(s\) \[1\] rejected"):
            migrate_experts({"w": mine}, old, new)

    # Same bad placement everywhere: every rank raises the precise error.
    old_without_0 = old.masked_fill(old == 0, 1)
    with pytest.raises(DeepEPInputError, match=r"logical expert\(s\) \[0\].*no slot of old_phy2log"):
        migrate_experts({"w": good}, old_without_0, new)
    with pytest.raises(DeepEPInputError, match="not a multiple"):
        migrate_experts({"w": good}, old, new[:-1])
    with pytest.raises(DeepEPTypeError, match="integer"):
        migrate_experts({"w": good}, old, new.float())
    with pytest.raises(DeepEPInputError, match="both be 1-D"):
        migrate_experts({"w": good}, old, new.unsqueeze(0))

    # Ranks disagree: every rank names the odd one.
    odd_new = new.roll(1) if rank == R - 1 else new
    with pytest.raises(RankMismatchError, match=rf"new placement.*disagreeing rank\(s\) \[{R - 1}\]"):
        migrate_experts({"w": good}, old, odd_new)
    odd_t = good.double() if rank == 0 and R > 2 else good
    if R > 2:
        with pytest.raises(RankMismatchError, match=r"expert tensors.*disagreeing rank\(s\) \[0\]"):
            migrate_experts({"w": odd_t}, old, new)

    # Optimizer problems.
    p = torch.nn.Parameter(good.clone())
    opt = torch.optim.Adam([p])
    opt.state[p] = {
        "step": torch.tensor(3.0 if rank == R - 1 else 4.0),
        "exp_avg": torch.zeros_like(good),
        "exp_avg_sq": torch.zeros_like(good),
    }
    with pytest.raises(RankMismatchError, match=rf"scalar state.*disagreeing rank\(s\) \[{R - 1}\]"):
        migrate_experts([p], old, new, optimizer=opt)
    opt.state[p]["step"] = torch.tensor(4.0)
    with pytest.raises(DeepEPInputError, match="in place"):
        migrate_experts([p], old, new, optimizer=opt, inplace=False)
    opt.state[p]["factored"] = torch.zeros(4)
    with pytest.raises(DeepEPInputError, match=r"'factored'.*shape \(4,\).*not supported"):
        migrate_experts([p], old, new, optimizer=opt)
    del opt.state[p]["factored"]
    with pytest.raises(DeepEPInputError, match="same tensor"):
        migrate_experts([p, p], old, new, optimizer=opt)

    # Nothing was moved by the failed calls, and the group still works.
    assert bits_equal(p.data, good)
    migrate_experts([p], old, new, optimizer=opt)
    assert bits_equal(p.data, local_rows(table, new, rank, R))
    return True


@pytest.mark.parametrize("R", [2, 4])
def test_migrate_errors(rank_pool, R):
    assert all(rank_pool(R).run(rank_errors))


def test_single_process_and_plan():
    """Without torch.distributed a single rank is assumed; the plan and the move count are pure functions."""
    assert not (dist.is_available() and dist.is_initialized())
    g = torch.Generator().manual_seed(0)
    old, new = rand_placement(g, 6, 9), rand_placement(g, 6, 9)
    w = torch.randn((6, 3), generator=g)
    assert bits_equal(migrate_experts({"w": w[old]}, old, new)["w"], w[new])
    assert placement_moves(old, new, 1) == 0  # one rank holds every expert

    # Local copies are preferred; one copy per (rank, expert); sources spread over holders.
    old = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])  # rank 0: 0 1 2 3 | rank 1: 0 1 2 3 (2 ranks)
    new = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # every expert is on both ranks already
    assert placement_moves(old, new, 2) == 0
    old = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # 4 ranks: rank r holds expert r twice
    new = torch.tensor([3, 3, 0, 0, 1, 1, 2, 2])
    plan = plan_migration(old, new, 4)
    assert isinstance(plan, MigrationPlan) and plan.num_moves == 4 == placement_moves(old, new, 4)
    assert moved_experts(old, new, 4) == 8  # replicas, not copies on the wire
    assert plan.send_counts().tolist() == [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]]
    assert plan.targets.shape == (8, 2) and plan.local.shape == (0, 4)
    old = torch.tensor([0, 1, 0, 1, 2, 3, 2, 3])  # 2 ranks; each wants the other's experts, twice each:
    new = torch.tensor([2, 3, 2, 3, 0, 1, 0, 1])  # one copy per (rank, expert) crosses, sources spread
    plan = plan_migration(old, new, 2)
    assert plan.send_counts().tolist() == [[0, 2], [2, 0]] and moved_experts(old, new, 2) == 8
    assert plan.transfers.tolist() == plan_migration(old.numpy(), new.tolist(), 2).transfers.tolist()

    # Layered placements count every layer.
    assert placement_moves(torch.stack([old, old]), torch.stack([new, old]), 2) == 4

    # Bad inputs of the pure functions.
    with pytest.raises(DeepEPInputError, match="negative"):
        placement_moves(torch.tensor([0, -1]), torch.tensor([0, 0]), 1)
    with pytest.raises(DeepEPInputError, match=r"\[num_replicas\] or \[layers, num_replicas\]"):
        placement_moves(torch.zeros((1, 1, 2), dtype=torch.int64), torch.zeros((1, 1, 2), dtype=torch.int64), 1)
    with pytest.raises(DeepEPInputError, match="layers"):
        placement_moves(torch.zeros((2, 4), dtype=torch.int64), torch.zeros((3, 4), dtype=torch.int64), 2)
    with pytest.raises(DeepEPTypeError):
        placement_moves("0123", [0, 1, 2, 3], 2)
    with pytest.raises(DeepEPInputError, match="num_ranks"):
        placement_moves([0, 1], [1, 0], 0)
    with pytest.raises(DeepEPInputError, match="empty"):
        migrate_experts({}, [0, 1], [1, 0])
    with pytest.raises(DeepEPTypeError, match="local_params"):
        migrate_experts("w", [0, 1], [1, 0])
    with pytest.raises(DeepEPInputError, match="bucket_bytes"):
        migrate_experts([torch.zeros(2, 3)], [0, 1], [1, 0], bucket_bytes=0)
    with pytest.raises(DeepEPInputError, match="all must share one device"):
        migrate_experts([torch.zeros(2, 3), torch.zeros(2, 3, device="meta")], [0, 1], [1, 0])
