"""deep_ep.utils (the helpers DeepEP's scripts import) and ElasticBuffer's index and reduction math, in one process."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from deep_ep.elastic import layout as lay
from deep_ep.elastic import reduce as red
from deep_ep.elastic.events import ElasticEventOverlap, StreamScope
from deep_ep.utils import envs, gate, refs, testing
from deep_ep.utils import math as um
from tests._pool import REPO_ROOT


# ---------------------------------------------------------------------- deep_ep.utils.math
def test_fp8_round_trip():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn((9, 300), generator=g) * 3).to(torch.bfloat16)
    q, s = um.per_token_cast_to_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (9, 300) and s.shape == (9, 3) and s.dtype == torch.float32
    assert float(q.float().abs().max()) <= 448.0
    back = um.per_token_cast_back(q, s)
    assert back.dtype == torch.bfloat16 and 0 < um.calc_diff(back, x) < 1e-3
    assert um.calc_diff(um.per_token_cast_back(q, s.t().contiguous().t()), back) == 0  # strides do not matter
    assert um.per_token_cast_back(q[:0], s[:0]).shape == (0, 300)


def test_fp8_ue8m0_scales():
    """Packed power-of-two scales: byte e of an int32 means 2 ** (e - 127) for its 128 values."""
    q = torch.full((2, 512), 1.5, dtype=torch.float32).to(torch.float8_e4m3fn)
    exps = torch.tensor([[127, 128, 126, 130], [120, 127, 127, 127]], dtype=torch.uint8)
    packed = exps.contiguous().view(torch.int32)  # [2, 1]
    out = um.per_token_cast_back(q, packed).float()
    want = 1.5 * torch.pow(2.0, exps.float() - 127).repeat_interleave(128, dim=1)
    assert torch.equal(out, want)


def test_small_math():
    assert um.ceil_div(7, 2) == 4 and um.align(7, 4) == 8 and um.align(8, 4) == 8
    assert um.safe_div(0, 0) == 0 and um.safe_div(3, 2) == 1.5
    with pytest.raises(ZeroDivisionError):
        um.safe_div(1, 0)
    a = torch.randn(5, 7)
    assert um.calc_diff(a, a) == pytest.approx(0, abs=1e-12) and um.calc_diff(a, -a) > 0.1
    assert um.count_bytes(torch.zeros(3, dtype=torch.int64), (torch.zeros(2, dtype=torch.bfloat16), None)) == 28
    t = torch.arange(8, dtype=torch.int32)
    h0 = um.hash_tensor(t)
    t[3] += 1
    assert um.hash_tensor(t) != h0 and um.hash_tensors(t, [t]) == 0
    scores = torch.ones(2, 6)
    grouped = um.create_grouped_scores(scores, torch.tensor([[0], [2]]), 3)
    assert grouped.tolist() == [[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1]]


def test_inplace_unique():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-1, 6, (40, 5), generator=g)
    want = [sorted({v for v in row if v >= 0}, reverse=True) for row in x.tolist()]
    um.inplace_unique(x, 6)
    for row, w in zip(x.tolist(), want):
        assert row == (w + [-1] * 5)[:5]


# ---------------------------------------------------------------------- deep_ep.utils.refs (V2's combine spec)
def test_refs_combine_order_by_hand():
    """Hand-computed cases where the order and grouping of the float32 additions decide the answer.

    ``B = 2**24``: ``1 + B`` rounds back to ``B`` (the 1 is lost), ``B - B`` is exactly 0, and
    ``2 + B - B`` is exactly 2 (``B + 2`` is representable). Bias is 1 throughout.
    """
    B = 2.0**24
    y = torch.tensor([[[B], [1.0], [-B]]], dtype=torch.bfloat16)  # one token, K = 3, H = 1
    bias = torch.ones((1, 1), dtype=torch.bfloat16)

    # 3 ranks, one expert each, slots to ranks [1, 0, 2]: V2 adds at each group's last slot, i.e. in slot
    # order: ((1 + B) + 1) - B = 0. (Rank order would give ((1 + 1) + B) - B = 2.)
    idx = torch.tensor([[1, 0, 2]])
    assert float(refs.combine(y, idx, 1, 3, 3, bias, True, False)) == 0.0

    # 2 ranks, slots to ranks [1, 0, 1]: rank 1 first sums its slots (B - B = 0), so 1 + 1 + 0 = 2; without
    # the local reduction every slot is added in order: ((1 + B) + 1) - B = 0.
    idx = torch.tensor([[1, 0, 1]])
    assert float(refs.combine(y, idx, 1, 2, 2, bias, True, False)) == 2.0
    assert float(refs.combine(y, idx, 1, 2, 2, bias, False, False)) == 0.0

    # 4 ranks as 2 domains of 2, slots to ranks [0, 2, 1] (domains [0, 1, 0]): hybrid sums domain 0 first
    # (B - B = 0): 1 + 1 + 0 = 2; the flat recipe adds per rank in slot order: ((1 + B) + 1) - B = 0.
    idx = torch.tensor([[0, 2, 1]])
    assert float(refs.combine(y, idx, 2, 2, 4, bias, True, True)) == 2.0
    assert float(refs.combine(y, idx, 1, 4, 4, bias, True, False)) == 0.0

    # Two biases are summed first (in float32), then the slots.
    two = (torch.full((1, 1), B, dtype=torch.bfloat16), torch.full((1, 1), -B, dtype=torch.bfloat16))
    assert (
        float(refs.combine(torch.ones((1, 1, 1), dtype=torch.bfloat16), torch.tensor([[0]]), 1, 1, 1, two, True, False))
        == 1.0
    )
    with pytest.raises(ValueError):
        refs.combine(y, idx, 1, 4, 4, None, False, True)


def test_refs_helpers():
    src = torch.tensor([0, 5, 17])
    a = refs.generate_pre_combine_data(src, 8, 3, 16)
    assert a.shape == (3, 3, 16) and a.dtype == torch.bfloat16 and float(a.abs().max()) <= 1
    assert torch.equal(a, refs.generate_pre_combine_data(src, 8, 3, 16))
    assert torch.equal(a[1], refs.generate_pre_combine_data(src[1:2], 8, 3, 16)[0])  # per token, not per batch
    envs.init_seed(5)
    assert envs.get_global_seed() == 5 and envs.get_local_seed() == 5
    assert not torch.equal(a, refs.generate_pre_combine_data(src, 8, 3, 16))
    envs.init_seed(0)
    init = torch.ones((3, 16))
    acc = refs.ordered_accumulate(a, init)
    assert torch.equal(init, torch.ones((3, 16))) and acc.dtype == torch.bfloat16
    want = init.clone()
    for k in range(3):
        want += a[:, k].float()
    assert torch.equal(acc, want.to(torch.bfloat16))


# ---------------------------------------------------------------------- ElasticBuffer's index math
def test_expand_slots_brute_force():
    g = torch.Generator().manual_seed(3)
    n, K, L, a = 37, 4, 5, 8
    idx = torch.randint(-1, L, (n, K), generator=g)
    counts = lay.expert_counts(idx, L)
    assert counts.tolist() == [int((idx == e).sum()) for e in range(L)]
    psum, starts = lay.expert_psum(counts, a, expanded=True)
    slot = lay.expand_slots(idx, counts, starts)
    nxt = [int(s) for s in starts]
    for i in range(n):
        for k in range(K):
            e = int(idx[i, k])
            if e < 0:
                assert int(slot[i, k]) == -1
            else:
                assert int(slot[i, k]) == nxt[e]
                nxt[e] += 1
    assert [int(p) for p in psum] == nxt
    Ne = int(lay.expert_psum(counts, a, expanded=False)[0][-1])
    pairs = lay.slot_pairs(slot, Ne)
    for j, p in enumerate(pairs.tolist()):
        if p >= 0:
            assert int(slot.view(-1)[p]) == j
    assert int((pairs >= 0).sum()) == int((idx >= 0).sum())
    assert lay.worst_expanded_rows(2, 10, 4, 5, 8) == lay.align_up(2 * 10 * 4 + 7 * 5, 8)


def test_home_positions_brute_force():
    g = torch.Generator().manual_seed(4)
    T, K, E, R = 11, 3, 8, 4
    L = E // R
    idx = torch.rand((T, E), generator=g).topk(K, dim=1).indices
    idx[2, 1] = -1
    in_rank = torch.zeros((T, R), dtype=torch.bool).scatter_(1, (idx // L).clamp(min=0), True)
    in_rank[2] = False
    in_rank[2].scatter_(0, idx[2][idx[2] >= 0] // L, True)
    pos = lay.home_row_positions(in_rank)
    expect = [(r, t) for r in range(R) for t in range(T) if in_rank[t, r]]
    for j, (r, t) in enumerate(expect):
        assert int(pos[t, r]) == j
    pp = lay.home_pair_positions(idx)
    order = sorted((int(idx[t, k]), t, k) for t in range(T) for k in range(K) if idx[t, k] >= 0)
    for j, (_, t, k) in enumerate(order):
        assert int(pp[t, k]) == j
    counts = in_rank.sum(0)
    src, valid = lay.row_sources(counts, int(counts.sum()) + 3)
    assert src.tolist() == [r for r in range(R) for _ in range(int(counts[r]))] + [-1] * 3
    assert valid.tolist() == [True] * int(counts.sum()) + [False] * 3
    prefix = torch.cumsum(torch.stack([counts, counts + 1]), 0).to(torch.int32)
    assert lay.source_counts(prefix, 2).tolist() == [int(counts[2]), int(counts[2]) + 1]
    assert lay.scaleup_psum(torch.tensor([3, 1, 4, 1]), 2).tolist() == [7, 9]


def test_last_in_group():
    groups = torch.tensor([[0, 1, 0, -1], [2, 2, 2, 2], [-1, -1, 3, 1]])
    assert red.last_in_group(groups).tolist() == [
        [False, True, True, False],
        [False, False, False, True],
        [False, False, True, True],
    ]


@pytest.mark.parametrize("hybrid", [False, True])
def test_home_reduction_matches_spec(hybrid):
    """The gather-based home reduction equals refs.combine (the K-loop specification), bit for bit, on
    order-sensitive data: 4 ranks, as 2 scale-up domains of 2 when hybrid."""
    g = torch.Generator().manual_seed(6)
    T, K, E, R, H = 30, 4, 16, 4, 8
    L = E // R
    idx = torch.rand((T, E), generator=g).topk(K, dim=1).indices
    idx[torch.rand((T, K), generator=g) < 0.2] = -1
    y = torch.randn((T, K, H), generator=g).to(torch.bfloat16)
    y[:, 0] = 2.0**24
    y[idx < 0] = 0
    owner = torch.where(idx >= 0, idx // L, torch.full_like(idx, -1))
    in_rank = torch.zeros((T, R + 1), dtype=torch.bool).scatter_(1, torch.where(owner >= 0, owner, R), True)[:, :R]
    pos = lay.home_row_positions(in_rank)
    rows = torch.full((int(in_rank.sum()) + 2, H), float("nan"), dtype=torch.bfloat16)
    for t in range(T):
        for r in range(R):
            if in_rank[t, r]:
                acc = torch.zeros(H)
                for k in range(K):
                    if int(owner[t, k]) == r:
                        acc += y[t, k].float()
                rows[int(pos[t, r])] = acc.to(torch.bfloat16)
    biases = [torch.randn((T, H), generator=g).to(torch.bfloat16) for _ in range(2)]
    so, su = (2, 2) if hybrid else (1, 4)
    got = red.reduce_home_rows(rows, pos, owner, biases, 2 if hybrid else None)
    want = refs.combine(y, idx, so, su, E, tuple(biases), True, hybrid)
    assert torch.equal(got, want)
    assert not torch.isnan(got).any()


# ---------------------------------------------------------------------- gate, testing, envs, events
def test_gate_ratio():
    torch.manual_seed(0)
    T, E, R, K = 2000, 32, 4, 4
    balanced = gate.get_unbalanced_scores(T, E, R, K, 1.0, device=torch.device("cpu"))
    c = gate.rank_token_counts(balanced.topk(K, dim=1).indices, E, R).float()
    assert float(c[0] / c[1:].mean()) == pytest.approx(1.0, abs=0.15)
    for precise in (False, True):
        s = gate.get_unbalanced_scores(T, E, R, K, 2.0, precise=precise, device=torch.device("cpu"))
        c = gate.rank_token_counts(s.topk(K, dim=1).indices, E, R).float()
        assert float(c[0] / c[1:].mean()) == pytest.approx(2.0, rel=0.1)
    with pytest.raises(ValueError):
        gate.get_unbalanced_scores(T, E, R, K, 0.5)


def test_timing_helpers():
    calls = []
    avg, lo, hi = testing.bench(lambda: calls.append(1), num_warmups=2, num_tests=5)
    assert len(calls) == 7 and 0 <= lo <= avg <= hi
    one = testing.bench_kineto(lambda: sum(range(1000)), "dispatch_impl", num_tests=3)
    two = testing.bench_kineto(lambda: sum(range(1000)), ("a", "b"), num_tests=3, num_kernels_per_period=2)
    assert isinstance(one, float) and one > 0
    assert len(two) == 2 and len(two[0]) == 2 and two[0][0] > 0
    with testing.suppress_stdout_stderr():
        sys.stdout.write("hidden\n")


def test_events_on_cpu():
    scope = StreamScope(torch.device("cpu"), None, ElasticEventOverlap(None), True, True)
    with scope:
        scope.wait_before_epilogue(None)
    ev = scope.finish([torch.zeros(2)])
    assert ev.event is None
    ev.current_stream_wait(release_handle=True)


def test_envs_local():
    assert envs.default_device().type in ("cpu", "cuda")
    assert envs.get_nvlink_gbs() == 0.0 and envs.get_rdma_gbs() == 0.0 and not envs.check_fast_rdma_atomic_support()
    envs.check_torch_deterministic()
    envs.check_nvlink_connections(None)


def test_import_without_triton_or_gpu():
    """deep_ep, ElasticBuffer and deep_ep.utils import where neither Triton nor CUDA exists; deep_ep.utils
    loads only on first use."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import deep_ep\n"
        "assert 'deep_ep.utils' not in sys.modules\n"
        "from deep_ep import ElasticBuffer, EPHandle\n"
        "import deep_ep.utils.refs, deep_ep.utils.testing, deep_ep.utils.gate\n"
        "assert deep_ep.utils.math.align(5, 4) == 8\n"
    )
    env = {"PYTHONPATH": REPO_ROOT, "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO_ROOT, timeout=120)


def rank_domain_sizes(rank, R):
    import torch.distributed as dist

    assert envs.get_physical_domain_size(dist.group.WORLD) == (1, R)
    assert envs.get_logical_domain_size(dist.group.WORLD) == (1, R)


def test_domain_sizes(rank_pool):
    rank_pool(2).run(rank_domain_sizes)
