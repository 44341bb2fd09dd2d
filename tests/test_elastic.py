"""ElasticBuffer (DeepEP V2's API) conformance: every CPU transport against both oracles.

Each scenario draws every rank's inputs from one seed (``make_case``), so each rank
computes, with no communication, what deep_ep's V1 oracle (:mod:`deep_ep.reference`)
says it must receive, and checks the V2 layouts built from it. Combine results are
checked bit for bit against the V2-order specification (:func:`deep_ep.utils.refs.combine`)
and within bf16 rounding against the V1 oracle's rank-order sums; the collective
V2-style reference (:func:`deep_ep.utils.refs.dispatch`) is checked too.
"""

from __future__ import annotations

import zlib
from typing import Dict, List

import pytest
import torch

import deep_ep
from deep_ep import reference as ref
from deep_ep.elastic.layout import align_up, worst_expanded_rows
from deep_ep.utils import refs as v2refs
from tests._cases import WORKER_CACHE, assert_same, device, make_case

BACKENDS = ["collective", "hierarchical"]
GPU_BACKENDS = ["collective", "nvlink", "hierarchical"]

SCENARIOS: Dict[str, dict] = {
    "basic": dict(),
    "align128_bias2": dict(expert_alignment=128, nbias=2),
    "bias1_no_handle_copy": dict(nbias=1, handle_copy=False),
    "fp8_colmajor": dict(hidden=256, fp8=True, colmajor=True, tma_sf=True, nbias=1),
    "fp8_ue8m0_bytes": dict(hidden=512, ue8m0=True),
    "no_cpu_sync": dict(sync=False, expert_alignment=4, nbias=2),
    "no_cpu_sync_fp8": dict(sync=False, hidden=256, fp8=True, expert_alignment=128),
    "events": dict(previous_event=True, async_=True, allocate_on_comm_stream=True, nbias=1),
    "no_weights": dict(weights=False),
    "empty_rank": dict(pattern="empty_rank", nbias=1),
    "one_expert": dict(pattern="one_expert", topk=2, expert_alignment=8),
    "all_ranks": dict(pattern="all_ranks", topk=2),
    "empty_tokens": dict(tokens="zero0", sync=False),
    "no_multiple_reduction": dict(multiple_reduction=False, nbias=2, expert_alignment=4),
    "topk1": dict(topk=1, num_experts=16),
    # Big values that cancel in some slots: float32 sums then depend on the order, which must be V2's.
    "wide_range_order": dict(wide=True, nbias=2, topk=4),
    "wide_range_order_expanded_pairs": dict(wide=True, nbias=1, topk=4, multiple_reduction=False),
}


def get_elastic(backend: str, **kwargs) -> deep_ep.ElasticBuffer:
    """An ElasticBuffer on the default group, cached per worker (creation is collective: all ranks call alike)."""
    key = ("elastic", backend, tuple(sorted(kwargs.items())))
    buf = WORKER_CACHE.get(key)
    if buf is None or buf._destroyed:
        buf = deep_ep.ElasticBuffer(None, backend=backend, **kwargs)
        WORKER_CACHE[key] = buf
    return buf


def _pair_rows(x, index: torch.Tensor):
    return tuple(t[index] for t in x) if isinstance(x, tuple) else x[index]


def _ue8m0(xs: List[torch.Tensor]):
    """fp8 values with packed power-of-two scales (int32, four exponents per int): V2's UE8M0 format."""
    out = []
    for x in xs:
        T, H = x.shape
        blocks = x.float().view(T, H // 128, 128)
        exp = torch.ceil(torch.log2(blocks.abs().amax(dim=2).clamp(min=1e-4) / 448.0)).clamp(-127, 127)
        q = (blocks / torch.exp2(exp).unsqueeze(2)).to(torch.float8_e4m3fn).view(T, H)
        packed = (exp + 127).to(torch.uint8).contiguous().view(torch.int32)
        out.append((q, packed))
    return out


def _inputs(case, sc: dict):
    if sc.get("ue8m0"):
        return _ue8m0(case.xs)
    return case.fp8 if case.fp8 is not None else case.xs


def _expert_outputs(global_idx: torch.Tensor, K: int, H: int, M: int, wide: bool = False) -> torch.Tensor:
    """The "expert output" of every (token, k): any rank can compute any other rank's (V2's test style).
    ``wide``: slots 0, 4, .. hold +2**24 and slots 2, 6, .. -2**24 (exact in bf16): float32 sums then depend on the
    order and grouping of the additions (a small value added next to a big one is lost)."""
    y = v2refs.generate_pre_combine_data(global_idx, M, K, H)
    if wide:
        for k in range(0, K, 2):
            y[:, k] = 2.0**24 if k % 4 == 0 else -(2.0**24)
    return y


def run_elastic(rank: int, R: int, backend: str, seed: int, sc: dict) -> dict:
    """Fresh, expanded, cached dispatches and both combines on every rank, checked against the oracles."""
    dev = device()
    tokens = sc.get("tokens")
    if tokens == "zero0":
        tokens = [0] + [5 + 3 * r for r in range(1, R)]
    E = sc.get("num_experts", 4 * R if R > 2 else 8)
    H, K = sc.get("hidden", 64), sc.get("topk", 3)
    case = make_case(
        seed,
        R,
        num_experts=E,
        hidden=H,
        topk=K,
        tokens=tokens,
        pattern=sc.get("pattern", "random"),
        fp8=sc.get("fp8", False),
    )
    L = E // R
    M = max(case.tokens + [1]) + 3
    amr = sc.get("multiple_reduction", True)
    kw = dict(allow_multiple_reduction=amr, num_max_tokens_per_rank=M)
    if backend == "hierarchical":
        kw["ranks_per_node"] = sc.get("ranks_per_node", 1)
    buf = get_elastic(backend, **kw)
    so, su = buf.get_logical_domain_size()
    hybrid = so > 1 and amr
    xs = _inputs(case, sc)
    a = sc.get("expert_alignment", 1)
    sync = sc.get("sync", True)
    use_w = sc.get("weights", True)
    exp = ref.dispatch(xs, case.topk_idx, E, case.topk_weights if use_w else None, expert_alignment=a)
    e = exp[rank]
    n_true = e.num_recv_tokens
    x = tuple(t.to(dev) for t in xs[rank]) if isinstance(xs[rank], tuple) else xs[rank].to(dev)
    if sc.get("colmajor"):
        x = (x[0], x[1].t().contiguous().t())
    idx = case.topk_idx[rank].to(dev)
    w = case.topk_weights[rank].to(dev) if use_w else None
    T = case.tokens[rank]
    events = dict(
        async_with_compute_stream=sc.get("async_", False),
        allocate_on_comm_stream=sc.get("allocate_on_comm_stream", False),
    )
    prev = (lambda: buf.capture()) if sc.get("previous_event") else (lambda: None)
    stats = torch.zeros((L,), dtype=torch.int32, device=dev)
    args = dict(
        topk_idx=idx,
        topk_weights=w,
        num_experts=E,
        expert_alignment=a,
        do_cpu_sync=sync,
        do_handle_copy=sc.get("handle_copy", True),
        use_tma_aligned_col_major_sf=sc.get("tma_sf", False),
        **events,
    )

    # ---------------- non-expanded dispatch
    recv_x, ridx, rw, h, ev = buf.dispatch(x, cumulative_local_expert_recv_stats=stats, previous_event=prev(), **args)
    assert isinstance(ev, deep_ep.EventOverlap)
    ev.current_stream_wait()
    n = R * M if not sync else n_true
    assert h.num_recv_tokens == n and ridx.shape == (n, K)
    head = torch.arange(n_true, device=dev)
    assert_same(_pair_rows(recv_x, head), e.recv_x, "recv_x")
    assert_same(ridx[:n_true], e.recv_topk_idx, "recv_topk_idx")
    assert bool((ridx[n_true:] == -1).all()), "padding rows of recv_topk_idx must be -1"
    src_rank, src_tok = e.recv_src_rank, e.recv_src_token
    if use_w:  # V2 keeps the whole weights row of every received token
        want_w = (
            torch.stack([case.topk_weights[s][t] for s, t in zip(src_rank.tolist(), src_tok.tolist())])
            if n_true
            else torch.zeros((0, K))
        )
        assert_same(rw[:n_true], want_w, "recv_topk_weights")
        assert_same(rw[:n_true].masked_fill(ridx[:n_true] < 0, 0), e.recv_topk_weights, "recv_topk_weights (masked)")
    else:
        assert rw is None
    if sc.get("tma_sf"):
        assert recv_x[1].stride() == (1, align_up(n, 4)), recv_x[1].stride()
    meta = h.recv_src_metadata
    assert meta.dtype == torch.int32 and meta.shape == (n, K + 2)
    assert_same(meta[:n_true, 0], (src_rank * M + src_tok).to(torch.int32), "recv_src_metadata[:, 0]")
    first_k = (e.recv_topk_idx >= 0).to(torch.int8).argmax(dim=1)
    assert_same(meta[:n_true, 1], ((src_rank % su) * K + first_k).to(torch.int32), "recv_src_metadata[:, 1]")
    assert bool((meta[n_true:] == -1).all()) and bool((meta[:, 2:] == -1).all())
    counts = torch.tensor([int((e.recv_topk_idx == i).sum()) for i in range(L)], dtype=torch.int64)
    aligned = (counts + a - 1) // a * a
    assert_same(stats, counts.to(torch.int32), "cumulative_local_expert_recv_stats")
    assert_same(h.num_unaligned_recv_tokens_per_expert, counts.to(torch.int32), "unaligned counts")
    assert_same(h.psum_num_recv_tokens_per_expert, torch.cumsum(aligned, 0).to(torch.int32), "psum per expert")
    assert h.num_recv_tokens_per_expert_list == (e.num_recv_tokens_per_expert_list if sync else [])
    per_src = torch.bincount(src_rank, minlength=R)
    per_su = torch.zeros(su, dtype=torch.int64).index_add_(0, torch.arange(R) % su, per_src)
    assert_same(
        h.psum_num_recv_tokens_per_scaleup_rank, torch.cumsum(per_su, 0).to(torch.int32), "psum per scale-up rank"
    )
    # dst_buffer_slot_idx: the row of (this rank, token) in the owner's received rows
    want_dst = torch.full((T, K), -1, dtype=torch.int32)
    for t in range(T):
        for k in range(K):
            g = int(case.topk_idx[rank][t, k])
            if g >= 0:
                d = exp[g // L]
                want_dst[t, k] = int(torch.nonzero((d.recv_src_rank == rank) & (d.recv_src_token == t))[0, 0])
    assert_same(h.dst_buffer_slot_idx, want_dst, "dst_buffer_slot_idx")
    if T:  # (empty tensors share data_ptr 0)
        assert (h.topk_idx.data_ptr() != idx.data_ptr()) == sc.get("handle_copy", True)
    assert_same(h.topk_idx, idx, "handle.topk_idx")

    # ---------------- expanded dispatch
    ex, eidx, ew, eh, eev = buf.dispatch(x, previous_event=prev(), do_expand=True, **args)
    eev.current_stream_wait()
    assert eidx is None and eh.do_expand
    Ne = int(aligned.sum()) if sync else worst_expanded_rows(R, M, K, L, a)
    ex_v = ex[0] if isinstance(ex, tuple) else ex
    assert ex_v.size(0) == Ne and eh.num_expanded_tokens == Ne
    starts = torch.cumsum(aligned, 0) - aligned
    assert_same(eh.psum_num_recv_tokens_per_expert, (starts + counts).to(torch.int32), "expanded psum")
    slots = eh.recv_src_metadata[:n_true, 2:].to(torch.int64)
    want_ew = torch.zeros(Ne, dtype=torch.float32)
    used = torch.zeros(Ne, dtype=torch.bool)
    for i in range(L):
        rows = [(r, k) for r in range(n_true) for k in range(K) if int(e.recv_topk_idx[r, k]) == i]
        for j, (r, k) in enumerate(rows):
            s = int(starts[i]) + j
            assert int(slots[r, k]) == s, f"slot of row {r} k {k}: {int(slots[r, k])} != {s}"
            used[s] = True
            if use_w:
                want_ew[s] = want_w[r, k]
    assert bool((slots[e.recv_topk_idx < 0] == -1).all())
    src_of = torch.full((Ne,), -1, dtype=torch.int64)
    for r in range(n_true):
        for k in range(K):
            if int(slots[r, k]) >= 0:
                src_of[int(slots[r, k])] = r
    got_parts = ex if isinstance(ex, tuple) else (ex,)
    want_parts = e.recv_x if isinstance(e.recv_x, tuple) else (e.recv_x,)
    for got, want in zip(got_parts, want_parts):
        got = got.cpu()
        if n_true:
            assert_same(got[used], want[src_of[used]], "expanded recv_x")
        pad_rows = got[~used].contiguous().view(torch.uint8)
        assert bool((pad_rows == 0).all()), "expanded padding rows must be zero"
    if use_w:
        assert_same(ew, want_ew, "expanded recv_topk_weights")
    else:
        assert ew is None

    # ---------------- deterministic: the same bits again
    again = buf.dispatch(x, do_expand=True, **args)
    assert_same(again[0], ex, "expanded recv_x, second run")
    if use_w:
        assert_same(again[2], ew, "expanded weights, second run")
    assert_same(again[3].recv_src_metadata, eh.recv_src_metadata, "metadata, second run")

    # ---------------- cached dispatches (same handle object back)
    cx, cidx, cw, ch, cev = buf.dispatch(x, handle=h, previous_event=prev(), **events)
    cev.current_stream_wait()
    assert ch is h and cw is None
    assert_same(cx, recv_x, "cached recv_x")
    assert_same(cidx, ridx, "cached recv_topk_idx")
    cex, _, cew, ceh, _ = buf.dispatch(
        x,
        handle=eh,
        topk_weights=w,
        do_expand=True,
        do_zero_padding=True,
        use_tma_aligned_col_major_sf=sc.get("tma_sf", False),
    )
    assert ceh is eh
    assert_same(cex, ex, "cached expanded recv_x")
    if use_w:
        assert_same(cew, ew, "cached expanded weights")

    # ---------------- combine
    wide = sc.get("wide", False)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    nbias = sc.get("nbias", 0)
    biases = [
        [torch.randn((case.tokens[s], H), generator=g).to(torch.bfloat16) for _ in range(nbias)] for s in range(R)
    ]
    bias = None if nbias == 0 else (biases[rank][0].to(dev) if nbias == 1 else tuple(b.to(dev) for b in biases[rank]))

    def rank_inputs(d: int) -> torch.Tensor:
        """Rank d's combine input (one row per received row): its experts' outputs summed in k order."""
        dd = exp[d]
        y = _expert_outputs(dd.recv_src_rank * M + dd.recv_src_token, K, H, M, wide)
        y[dd.recv_topk_idx < 0] = 0
        return v2refs.ordered_accumulate(y)

    mine = _expert_outputs(rank * M + torch.arange(T), K, H, M, wide)
    mine[case.topk_idx[rank] < 0] = 0
    want_w_home = torch.where(case.topk_idx[rank] >= 0, case.topk_weights[rank], 0.0) if use_w else None
    comb_in = torch.full((n, H), float("nan"), dtype=torch.bfloat16)  # padding rows must never be read
    comb_in[:n_true] = rank_inputs(rank)
    out, out_w, cev2 = buf.combine(comb_in.to(dev), h, topk_weights=rw, bias=bias, previous_event=prev(), **events)
    cev2.current_stream_wait()
    assert_same(
        out,
        v2refs.combine(mine, case.topk_idx[rank], so, su, E, (tuple(biases[rank]) if nbias else None), True, hybrid),
        "combined_x (V2 order)",
    )
    v1 = ref.combine([rank_inputs(d) for d in range(R)], exp, case.tokens, None, biases)[rank][0]
    if not wide:  # (rank-order sums: the same up to rounding)
        assert_same(out, v1, "combined_x vs the V1 oracle", atol=3e-2, rtol=2e-2)
    if use_w:
        assert_same(out_w, want_w_home, "combined_topk_weights")
    else:
        assert out_w is None

    ycomb = torch.full((Ne, H), float("nan"), dtype=torch.bfloat16)
    y_rows = _expert_outputs(src_rank * M + src_tok, K, H, M, wide)
    for r in range(n_true):
        for k in range(K):
            if int(slots[r, k]) >= 0:
                ycomb[int(slots[r, k])] = y_rows[r, k]
    eout, eout_w, _ = buf.combine(ycomb.to(dev), eh, topk_weights=ew, bias=bias)
    recipe = (True, hybrid) if amr else (False, False)
    assert_same(
        eout,
        v2refs.combine(mine, case.topk_idx[rank], so, su, E, (tuple(biases[rank]) if nbias else None), *recipe),
        "expanded combine (V2 order)",
    )
    if not wide:
        assert_same(eout, v1, "expanded combine vs the V1 oracle", atol=3e-2, rtol=2e-2)
    if use_w:
        assert_same(eout_w, want_w_home, "expanded combined_topk_weights")
    return {"recv": n_true}


def run_v2_reference(rank: int, R: int, backend: str, seed: int) -> None:
    """deep_ep.utils.refs.dispatch (a real all-to-all) agrees with the V1 oracle and with ElasticBuffer."""
    dev = device()
    case = make_case(seed, R, num_experts=8, hidden=32, topk=3)
    M = max(case.tokens) + 1
    exp = ref.dispatch(case.xs, case.topk_idx, 8, case.topk_weights)[rank]
    x, idx, w = case.xs[rank].to(dev), case.topk_idx[rank].to(dev), case.topk_weights[rank].to(dev)
    rx, ridx, rw, src, per_rank = v2refs.dispatch(x, idx, w, M, 8)
    assert_same(rx, exp.recv_x, "refs recv_x")
    assert_same(ridx, exp.recv_topk_idx, "refs recv_topk_idx")
    assert_same(rw.masked_fill(ridx < 0, 0), exp.recv_topk_weights, "refs recv_topk_weights")
    assert_same(src, (exp.recv_src_rank * M + exp.recv_src_token).to(torch.int32), "refs src idx")
    assert_same(per_rank, torch.bincount(exp.recv_src_rank, minlength=R).to(torch.int32), "refs per rank")
    buf = get_elastic(
        backend, num_max_tokens_per_rank=M, **({"ranks_per_node": 1} if backend == "hierarchical" else {})
    )
    bx, bidx, bw, h, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=8)
    assert_same(bx, rx, "ElasticBuffer vs refs: recv_x")
    assert_same(bidx, ridx, "ElasticBuffer vs refs: recv_topk_idx")
    assert_same(bw, rw, "ElasticBuffer vs refs: recv_topk_weights")
    assert_same(h.recv_src_metadata[:, 0], src, "ElasticBuffer vs refs: source index")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_elastic_cpu(rank_pool, backend, name):
    seed = zlib.crc32(f"elastic/{name}".encode())
    rank_pool(2).run(run_elastic, backend, seed, SCENARIOS[name])


@pytest.mark.parametrize("name", ["basic", "no_cpu_sync", "no_multiple_reduction", "wide_range_order"])
def test_elastic_hybrid_4_ranks(rank_pool, name):
    """4 ranks as 2 emulated nodes of 2: V2's hybrid combine (partials per node rounded first)."""
    seed = zlib.crc32(f"elastic-hybrid/{name}".encode())
    rank_pool(4).run(run_elastic, "hierarchical", seed, dict(SCENARIOS[name], ranks_per_node=2, nbias=2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_v2_reference_dispatch(rank_pool, backend):
    rank_pool(2).run(run_v2_reference, backend, 31)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(
    "name", ["basic", "fp8_colmajor", "no_cpu_sync", "no_cpu_sync_fp8", "events", "align128_bias2"]
)
def test_elastic_gpu(rank_pool, backend, name):
    """The same checks on 2 GPUs (NCCL): the comm stream, events and the no-host-sync path for real."""
    seed = zlib.crc32(f"elastic/{name}/gpu".encode())
    rank_pool(2, backend="nccl").run(run_elastic, backend, seed, SCENARIOS[name])
