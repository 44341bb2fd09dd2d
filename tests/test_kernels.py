"""Every Triton kernel of deep_ep.kernels against its torch twin (deep_ep.kernels.twins), on fresh random
inputs and the conformance suite's edge cases (empty ranks, every token to one expert, -1 entries, ids out
of range and the largest id, hidden sizes that are not multiples of 128, NaN / Inf rows).

On CUDA the kernels run compiled; on a machine without a GPU (CI) they run under Triton's interpreter
(``TRITON_INTERPRET=1``, set by ``tests/conftest.py``, with ``tests/_interpret.py``'s fidelity fixes), so
the same pointer arithmetic, masks and stores execute in numpy on CPU memory. Kernels that store into
other ranks' memory are run with every rank's region a slice of one tensor and the distances between them
as on the GPU; their phases (send, barrier, receive) run in program order, which is what the device
barrier between two launches guarantees. Every comparison is exact (bytes or values) unless a test says
why not; outputs are poisoned first so a store to the wrong row, or a missing one, shows.
"""

from __future__ import annotations

import pytest
import torch

from deep_ep import layout
from deep_ep import reference as ref
from deep_ep.kernels import twins
from tests import _interpret
from tests._cases import make_case

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = [
    pytest.mark.kernels,
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),  # numpy on inf - inf
    pytest.mark.skipif(
        not CUDA and not _interpret.enabled(), reason="needs CUDA or Triton's interpreter (TRITON_INTERPRET=1)"
    ),
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Bitwise equality (NaN == NaN for floats), with the first differing index in the message."""
    a, b = a.detach().cpu(), b.detach().cpu()
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.dtype} {list(a.shape)} vs {b.dtype} {list(b.shape)}"
    if a.is_floating_point():
        a, b = a.contiguous().view(_int_of(a)), b.contiguous().view(_int_of(b))
    diff = (a != b).nonzero()
    assert diff.numel() == 0, f"{what}: {diff.size(0)} elements differ, first at {diff[0].tolist()}"


def _int_of(t: torch.Tensor) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]


# ---------------------------------------------------------------------------------------------- layout
LAYOUT_CASES = [
    (0, 8, 16, 2, 2, 0, "rand"),  # no tokens
    (1, 1, 4, 1, 1, 1, "rand"),
    (37, 8, 64, 2, 1, 2, "bad"),  # ids outside [-1, E) are skipped
    (300, 6, 256, 8, 4, 3, "rand"),  # nodes of 4 ranks
    (129, 8, 288, 4, 2, 4, "one"),  # every token to one expert (the largest id)
    (50, 3, 12, 6, 3, 5, "bad"),
    (64, 9, 16, 4, 2, 6, "empty"),  # rank 0's experts never chosen
]


def check_layout_kernel(T, K, E, R, P, seed, mode, ticket=False):
    """The one-launch dispatch layout against layout.dispatch_layout_torch."""
    from deep_ep.kernels import layout as klayout

    g = _gen(seed)
    idx = torch.randint(-1, E, (T, K), generator=g)
    if mode == "bad":
        idx[::3, 0] = E  # the first invalid id
        idx[1::3, 0] = E + 2
        idx[1::5, -1] = -7
    if mode == "one":
        idx[:] = -1
        idx[:, 0] = E - 1
    if mode == "empty":
        idx = torch.where(idx < E // R, torch.full_like(idx, -1), idx)
    idx = idx.to(DEV)
    nodes = R // P if P < R else 0
    want = layout.dispatch_layout_torch(idx, E, R, P if P < R else None)
    got = klayout.dispatch_layout(idx, E, R, nodes, P, ticket=ticket)
    _sync()
    for a, b, name in zip(got, want, ("per rank", "per node", "per expert", "is_token_in_rank")):
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        _same(a, b, name)


@pytest.mark.parametrize("ticket", [False, True], ids=["zeroed-totals", "ticket"])
@pytest.mark.parametrize("T,K,E,R,P,seed,mode", LAYOUT_CASES)
def test_layout_kernel_matches_twin(T, K, E, R, P, seed, mode, ticket):
    check_layout_kernel(T, K, E, R, P, seed, mode, ticket)


@pytest.mark.gpu(1)
@pytest.mark.skipif(not CUDA, reason="a large case: GPU only")
def test_layout_kernel_large():
    check_layout_kernel(4096, 8, 256, 2, 2, 6, "rand")
    check_layout_kernel(500, 8, 128, 64, 8, 7, "rand")


# ---------------------------------------------------------------------------------------------- reduce
def _alloc(shape, dtype):
    return torch.empty(shape, dtype=dtype, device=DEV)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "T,H,R,nb,col,n_local",
    [(1, 7, 1, 0, -1, 0), (23, 130, 2, 1, 0, 9), (17, 64, 3, 2, 1, 0), (0, 64, 2, 0, -1, 0), (9, 33, 4, 1, 2, 5)],
)
def test_reduce_kernel_matches_twin(dtype, T, H, R, nb, col, n_local):
    """The combine reduction: per token the rows of every rank in rank order (returned rows, or for one
    column the rank's own rows), -1 = absent, float32 sums, biases, cast; NaN passes through."""
    from deep_ep.kernels import reduce as kreduce

    g = _gen(T * 131 + H + R + nb)
    S = max(T * R // 2, 1)
    back = torch.randn((S + 1, H), generator=g).to(dtype)
    back[S] = 0
    back[0, 0] = float("nan")
    back[min(1, S), min(2, H - 1)] = float("inf")
    local = torch.randn((n_local, H), generator=g).to(dtype) if n_local else None
    pos = torch.randint(0, S + 1, (T, R), generator=g)
    pos[torch.rand((T, R), generator=g) < 0.25] = -1
    if col >= 0:
        pos[:, col] = torch.randint(0, n_local, (T,), generator=g) if n_local else -1
    biases = [torch.randn((T, H), generator=g).to(dtype) for _ in range(nb)]
    back, pos, biases = back.to(DEV), pos.to(DEV), [b.to(DEV) for b in biases]
    local = local.to(DEV) if local is not None else None
    want = twins_reduce(back, pos, biases, dtype, local, col)
    out = torch.full((T, H), 7.0, dtype=dtype, device=DEV)
    got = kreduce.reduce_rows(back, pos, biases, out, local=local, local_col=col)
    _sync()
    _same(got, want, "reduced rows")
    # the twin itself against a float64 sum
    refsum = torch.zeros((T, H), dtype=torch.float64)
    for j in range(R):
        src = local if j == col and local is not None else back
        p = pos[:, j].cpu()
        rows = src.cpu().double()[p.clamp(min=0)] if src.size(0) else torch.zeros((T, H), dtype=torch.float64)
        refsum += torch.where((p >= 0).unsqueeze(1), rows, torch.zeros((), dtype=torch.float64))
    for b in biases:
        refsum += b.cpu().double()
    finite = torch.isfinite(refsum)
    tol = 3e-2 if dtype != torch.float32 else 1e-5
    assert torch.allclose(want.cpu().double()[finite], refsum[finite], atol=tol, rtol=tol)


def twins_reduce(back, pos, biases, dtype, local, col):
    from deep_ep.rows import reduce_rows_torch

    return reduce_rows_torch(back, pos, biases, dtype, _alloc, local=local, local_col=col)


# ---------------------------------------------------------------------------------------------- plan
def check_plan_kernel(T, R, rank, seed, disagree, over, bad_ids=False):
    """The fused device-plan kernel against its twin (layout, prefix matrix, verdict)."""
    from deep_ep.agreement import _H_E, _H_ERR, _H_WORST, _HEADER
    from deep_ep.kernels import plan as kplan
    from deep_ep.plans import _FIELDS

    g = _gen(seed)
    mask = torch.rand((T, R), generator=g) < 0.6
    n = _HEADER + R + 5
    meta = torch.randint(0, 50, (R, n), generator=g)
    meta[:, :_HEADER] = torch.randint(1, 4, (_HEADER,), generator=g)  # the same header on every rank
    meta[:, _H_ERR] = 0
    meta[:, _H_WORST] = 10_000
    meta[:, _H_E] = 16
    meta[:, _HEADER + R] = torch.randint(-1, 8, (R,), generator=g)  # each rank's least id
    meta[:, _HEADER + R + 1] = torch.randint(8, 16, (R,), generator=g)  # and its greatest
    if disagree:
        meta[R - 1, _FIELDS[-1]] += 1
    if over:
        meta[0, _H_WORST] = 1
        meta[:, _HEADER] = 2
    if bad_ids:
        meta[R - 1, _HEADER + R + (1 if R % 2 else 0)] = 16 if R % 2 else -2
    mask, meta = mask.to(DEV), meta.to(DEV)
    want = twins.device_plan_torch(mask, meta, rank, _HEADER, _FIELDS, _H_ERR, _H_WORST, _H_E)
    got = kplan.device_plan(mask, meta, rank, _HEADER, _FIELDS, _H_ERR, _H_WORST, _H_E)
    _sync()
    for k in ("slot", "send_pos", "combine_pos", "recv", "ret"):
        _same(getattr(got[0], k), getattr(want[0], k), k)
    _same(got[1], want[1], "rank_prefix_matrix")
    _same(got[2], want[2], "verdict")
    assert got[2].cpu().tolist() == [int(disagree and R > 1), int(over), int(bad_ids)]


@pytest.mark.parametrize("T,R,rank", [(0, 2, 0), (1, 1, 0), (37, 2, 1), (300, 3, 2), (40, 8, 7)])
@pytest.mark.parametrize(
    "disagree,over,bad_ids", [(False, False, False), (True, False, False), (False, True, False), (False, False, True)]
)
def test_plan_kernel_matches_twin(T, R, rank, disagree, over, bad_ids):
    check_plan_kernel(T, R, rank, T * 7 + R, disagree, over, bad_ids)


@pytest.mark.gpu(1)
@pytest.mark.skipif(not CUDA, reason="a large case: GPU only")
def test_plan_kernel_large():
    check_plan_kernel(5000, 4, 1, 9, False, False)


@pytest.mark.parametrize(
    "N,K,rank,L,n_valid,weights",
    [(0, 8, 0, 4, 0, True), (37, 3, 1, 4, 30, True), (300, 8, 3, 5, 300, False), (100, 1, 0, 1, 0, True)],
)
def test_localize_kernel_matches_twin(N, K, rank, L, n_valid, weights):
    """Received top-k ids to local ids (others -1, weights 0) and rows past the count -1 / 0."""
    from deep_ep.kernels import plan as kplan

    g = _gen(N * 31 + K + rank)
    idx = torch.randint(-1, 4 * max(L, 1), (N, K), generator=g).to(DEV)
    w = torch.randn((N, K), generator=g).to(DEV) if weights else None
    if weights and N:
        w[0, 0] = float("nan")
    n = torch.tensor([n_valid], device=DEV)
    got_i, got_w = kplan.localize_rows(idx, w, n, rank, L)
    want_i, want_w = twins.localize_rows_torch(idx, w, n, rank, L)
    _sync()
    _same(got_i, want_i, "local ids")
    if weights:
        _same(got_w, want_w, "weights")
    else:
        assert got_w is None and want_w is None
    # the twin against the host path's localisation and mask
    li, lw = layout.localize_topk(idx, w, rank, L)
    valid = (torch.arange(N, device=DEV) < n_valid).unsqueeze(1)
    _same(want_i, torch.where(valid, li, -1), "twin vs localize_topk")


# ---------------------------------------------------------------------------------------------- scatter
SCATTER_CASES = [(1792, torch.int64, 3), (7, torch.int32, 3), (40, torch.int16, 1), (3, torch.uint8, 5)]


def _regions_case(g, R, me, T, cap, W, dtype):
    def rnd(*shape):
        return torch.randint(0, 100, shape, generator=g).to(dtype).to(DEV)

    regions = rnd(R, cap, W)  # every rank's region: one tensor, rank d's at d * cap * W words
    delta = torch.tensor([(d - me) * cap * W for d in range(R)], dtype=torch.int64, device=DEV)
    return rnd, regions, delta


def check_scatter_kernels(W, dtype, nprog):
    """The device path's three kernels (scatter_rows, copy_out, return_blocks) against their twins, with
    the "peers" as regions of one tensor (the kernels see this rank's region and the distances)."""
    from deep_ep.kernels import scatter

    g = _gen(W * 7 + nprog)
    R, me, T, cap = 3, 1, 37, 64  # cap * W is a multiple of 16 words: aligned distances
    rnd, regions, delta = _regions_case(g, R, me, T, cap, W, dtype)
    src = rnd(T, W)
    mask = torch.rand((T, R), generator=g) < 0.6
    slot = torch.full((T, R), -1, dtype=torch.int64)
    for d in range(R):  # distinct slots per destination, some beyond the region (not written)
        perm = torch.randperm(cap + 4, generator=g)[:T]
        slot[:, d] = torch.where(mask[:, d], perm, -1)
    slot = slot.to(DEV)
    out = rnd(cap + 8, W)
    w_regions, w_out = regions.clone(), out.clone()
    twins.scatter_rows_torch(src, slot, w_out, list(w_regions), me)
    scatter.scatter_rows(src, slot, out, regions[me], delta, me, nprog)
    _sync()
    _same(regions, w_regions, "scatter_rows: regions")
    _same(out, w_out, "scatter_rows: own rows")

    dst = rnd(cap - 3, W)
    bounds = torch.tensor([41, 9, 20], dtype=torch.int64, device=DEV)  # n, own rows [lo, hi)
    want = dst.clone()
    twins.copy_out_torch(regions[me], want, bounds)
    scatter.copy_out(regions[me], dst, bounds, nprog)
    _sync()
    _same(dst, want, "copy_out")
    # the twin's contract, spelled out
    expect = dst.clone()
    expect[:9], expect[20:41], expect[41:] = regions[me, :9], regions[me, 20:41], 0
    _same(want, expect, "copy_out twin")

    x = rnd(50, W)
    table = torch.tensor([[3, 10, 5], [0, 0, 0], [20, 30, 40]], dtype=torch.int64, device=DEV)
    w_regions = regions.clone()
    twins.return_blocks_torch(x, table, [r[: cap - 1] for r in w_regions], me)
    scatter.return_blocks(x, table, regions[me][: cap - 1], delta, me, nprog)
    _sync()
    _same(regions, w_regions, "return_blocks")
    expect = regions.clone()
    expect[0, 5:15], expect[2, 40:63] = x[3:13], x[20:43]  # rows from cap - 1 on are not written
    _same(w_regions, expect, "return_blocks twin")


@pytest.mark.parametrize("W,dtype,nprog", SCATTER_CASES)
def test_scatter_kernels_match_twins(W, dtype, nprog):
    check_scatter_kernels(W, dtype, nprog)


@pytest.mark.parametrize("nprog", [1, 7])
def test_scatter_kernels_several_tensors_in_one_launch(nprog):
    """One launch moving several row tensors (word dtypes and widths differ, one is empty) equals the
    twins of each (and more than MAX_TENSORS tensors take several launches)."""
    from deep_ep.kernels import scatter

    g = _gen(11 + nprog)
    R, me, T, cap = 3, 2, 29, 48
    specs = [(1792, torch.int64), (7, torch.int32), (0, torch.int64), (40, torch.int16), (3, torch.uint8)]

    def rnd(*shape, dtype):
        return torch.randint(0, 100, shape, generator=g).to(dtype).to(DEV)

    srcs = [rnd(T, W, dtype=dt) for W, dt in specs]
    regions = [rnd(R, cap, W, dtype=dt) for W, dt in specs]
    deltas = [torch.tensor([(d - me) * cap * W for d in range(R)], dtype=torch.int64, device=DEV) for W, _ in specs]
    slot = torch.full((T, R), -1, dtype=torch.int64)
    for d in range(R):
        perm = torch.randperm(cap + 4, generator=g)[:T]
        slot[:, d] = torch.where(torch.rand((T,), generator=g) < 0.6, perm, -1)
    slot = slot.to(DEV)
    outs = [rnd(cap + 8, W, dtype=dt) for W, dt in specs]
    w_regions, w_outs = [r.clone() for r in regions], [o.clone() for o in outs]
    twins.scatter_rows_torch(srcs, slot, w_outs, [list(r) for r in w_regions], me)
    scatter.scatter_rows(srcs, slot, outs, [r[me] for r in regions], deltas, me, nprog)
    _sync()
    for i, (a, b) in enumerate(zip(regions + outs, w_regions + w_outs)):
        _same(a, b, f"scatter_rows tensor {i}")
    bounds = torch.tensor([30, 4, 11], dtype=torch.int64, device=DEV)
    dsts = [rnd(cap - 5, W, dtype=dt) for W, dt in specs]
    want = [d.clone() for d in dsts]
    twins.copy_out_torch([r[me] for r in regions], want, bounds)
    scatter.copy_out([r[me] for r in regions], dsts, bounds, nprog)
    _sync()
    for i, (a, b) in enumerate(zip(dsts, want)):
        _same(a, b, f"copy_out tensor {i}")
    table = torch.tensor([[3, 10, 5], [20, 9, 30], [0, 0, 0]], dtype=torch.int64, device=DEV)
    xs = [rnd(40, W, dtype=dt) for W, dt in specs]
    w_regions = [r.clone() for r in regions]
    twins.return_blocks_torch(xs, table, [[q[: cap - 1] for q in r] for r in w_regions], me)
    scatter.return_blocks(xs, table, [r[me][: cap - 1] for r in regions], deltas, me, nprog)
    _sync()
    for i, (a, b) in enumerate(zip(regions, w_regions)):
        _same(a, b, f"return_blocks tensor {i}")


# ---------------------------------------------------------------------------------------------- codecs
CODEC_CASES = [
    (8, 384, {}),
    (8, 300, {}),  # not a multiple of 128: the last block is short
    (8, 512, dict(use_ue8m0=True)),
    (8, 256, dict(round_scale=True)),
    (4, 300, {}),
    (4, 7, {}),  # odd: the last byte holds one value
    ("auto", 300, {}),
    ("auto", 64, dict(ratio=0.6)),
    ("auto", 130, dict(ratio=1.0)),  # every block int8
    ("auto", 1100, dict(ratio=0.9)),  # more than 32 upgrades: the sort branch
    ("auto", 256, dict(upgrades=0)),  # no upgrade: level 4's bytes
]


def _codec_rows(T, H, seed, dtype):
    g = _gen(seed)
    x = torch.randn((T, H), generator=g) * torch.logspace(-3, 3, T).unsqueeze(1)
    x[0, 0] = float("nan")
    x[min(1, T - 1), min(3, H - 1)] = float("inf")
    x[min(2, T - 1), min(5, H - 1)] = -float("inf")
    x[min(3, T - 1)] = 0
    x[min(4, T - 1)] = 1e-6  # below level 8's amax floor
    return x.to(dtype)


@pytest.mark.parametrize("level,H,kw", CODEC_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_codec_kernels_match_reference(level, H, kw, dtype):
    """encode: the same bytes as the codec's torch reference (also gathered rows into a staging view);
    decode: the same values (NaN where the reference has NaN)."""
    from deep_ep.codecs import make_codec

    c = make_codec(level, H, **kw)
    T = 13
    x = _codec_rows(T, H, hash((str(level), H)) % 1000, dtype).to(DEV)
    want = c.encode_reference(x.cpu())
    out = torch.full((T, c.row_bytes), 0xAB, dtype=torch.uint8, device=DEV)
    c._kernel_encode(x.contiguous(), None, out)
    _sync()
    _same(out, want, f"{c} encode")
    idx = torch.tensor([5, 0, T - 1, 5], device=DEV)
    area = torch.full((7, c.row_bytes), 0xAB, dtype=torch.uint8, device=DEV)
    c._kernel_encode(x.contiguous(), idx, area[2:6])
    _sync()
    _same(area[2:6], want[idx.cpu()], f"{c} gathered encode")
    assert bool((area[:2] == 0xAB).all()) and bool((area[6:] == 0xAB).all()), "wrote outside the view"
    for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
        dec = torch.full((T, H), 3.0, dtype=out_dtype, device=DEV)
        c._kernel_decode(want.to(DEV), dec)
        _sync()
        ref_vals = c.decode(want, out_dtype)  # on the CPU: the reference
        _same(dec, ref_vals, f"{c} decode to {out_dtype}")


def test_fp8_blocks_shared_with_the_low_latency_send():
    """The low-latency send casts rows with the codec's fp8_blocks: its data rows hold level 8's bytes (the
    values, then the scales): checked in test_low_latency_kernels_match_twins through ll_send_torch, which
    builds them from the codec reference."""
    from deep_ep.kernels import low_latency, quant

    assert low_latency.fp8_blocks is quant.fp8_blocks


# ---------------------------------------------------------------------------------------------- low latency
class _Arena:
    """Rank ``rank``'s arena as a slice of one tensor holding every rank's (the kernels' view of it)."""

    def __init__(self, big: torch.Tensor, rank: int, R: int, N: int) -> None:
        self.rank, self.num_ranks, self.nbytes = rank, R, N
        self.u8 = big[rank * N : (rank + 1) * N]
        self.i32, self.bf16 = self.u8.view(torch.int32), self.u8.view(torch.bfloat16)
        self.dbytes = torch.tensor([(p - rank) * N for p in range(R)], dtype=torch.int64, device=big.device)
        self.dwords = self.dbytes // 4


def _ll_buffers(lay, R, M, H, use_fp8, ue8m0):
    L, K = lay["L"], lay["K"]
    rows = L * R * M
    if use_fp8:
        vals = torch.full((L, R * M, H), 0x55, dtype=torch.uint8, device=DEV)
        nb = H // 128
        scales = torch.full((L, R * M, nb // 4 if ue8m0 else nb), 0x55, dtype=torch.int32, device=DEV)
        main, tail = vals.view(torch.int32).view(rows, H // 4), scales.view(rows, -1)
    else:
        vals = torch.full((L, R * M, H), 0x55, dtype=torch.bfloat16, device=DEV)
        scales = None
        main, tail = vals.view(torch.int32).view(rows, H // 2), None
    count = torch.full((L,), -5, dtype=torch.int32, device=DEV)
    src = torch.full((rows,), -5, dtype=torch.int32, device=DEV)
    inv = torch.full((R * M * K,), -1, dtype=torch.int32, device=DEV)
    return vals, scales, main, tail, count, src, inv


@pytest.mark.parametrize(
    "R,use_fp8,ue8m0,pattern,tokens",
    [
        (2, False, False, "random", None),
        (2, True, False, "random", None),
        (3, True, True, "random", None),
        (2, True, False, "one_expert", None),  # every token to one expert
        (3, False, False, "empty_rank", None),  # rank 0's experts never chosen
        (2, False, False, "random", [0, 0]),  # no tokens anywhere
    ],
)
def test_low_latency_kernels_match_twins(R, use_fp8, ue8m0, pattern, tokens):
    """send / recv / put_weights / combine_send / combine_reduce against their twins, R ranks' arenas in one
    tensor (phases in program order, as the barriers between the launches order them), every byte of every
    arena compared; and the results against the reference."""
    from deep_ep.codecs import make_codec
    from deep_ep.kernels import low_latency as k
    from deep_ep.transport.nvlink.low_latency import area_layout

    # the kernel path needs H % 8 == 0 (16-byte rows); fp8 H % 128, UE8M0 H % 512 (four scale bytes per word)
    M, H, E, K = 12, (512 if ue8m0 else 256) if use_fp8 else 136, 4 * R, 3
    tokens = tokens or [M, M - 5, 3][:R]
    case = make_case(
        R * 10 + int(use_fp8), R, hidden=H, topk=K, num_experts=E, tokens=tokens, neg_frac=0.2, pattern=pattern
    )
    lay = area_layout(R, E, M, K, H, use_fp8, ue8m0)
    N = 2 * lay["bytes"]
    big = torch.full((R * N,), 0x55, dtype=torch.uint8, device=DEV)
    arenas = [_Arena(big, r, R, N) for r in range(R)]
    twin_big = big.clone()
    twin_arenas = [twin_big[r * N : (r + 1) * N] for r in range(R)]
    xs = [x.to(DEV) for x in case.xs]
    idxs = [i.to(DEV) for i in case.topk_idx]
    for r in range(R):
        err, werr = torch.zeros(1, dtype=torch.int32, device=DEV), torch.zeros(1, dtype=torch.int32, device=DEV)
        k.send(xs[r].contiguous(), idxs[r].contiguous(), arenas[r], 0, lay, err, False, ue8m0)
        twins.ll_send_torch(xs[r], idxs[r], twin_arenas, r, 0, lay, werr, False, ue8m0)
        assert int(err[0]) == int(werr[0]) == 0
    _sync()
    _same(big, twin_big, "arenas after send")
    codec = make_codec(8, H, use_ue8m0=ue8m0) if use_fp8 else None
    sent = [codec.decode_reference(codec.encode_reference(x.float())) if codec else x.float() for x in case.xs]
    exp = ref.low_latency_dispatch(sent, case.topk_idx, M, E)
    L = lay["L"]
    states = []
    for r in range(R):
        got = _ll_buffers(lay, R, M, H, use_fp8, ue8m0)
        want = _ll_buffers(lay, R, M, H, use_fp8, ue8m0)
        k.recv(arenas[r], 0, lay, got[2], got[3], got[4], got[5], got[6], 5)
        twins.ll_recv_torch(twin_arenas[r], 0, lay, R, want[2], want[3], want[4], want[5], want[6])
        _sync()
        for a, b, name in zip(got[2:], want[2:], ("rows", "scales", "count", "src", "inv")):
            if a is not None:
                _same(a, b, f"recv {name} on rank {r}")
        vals, scales, _, _, count, _, inv = got
        want_rows, want_counts, _ = exp[r]
        _same(count.cpu(), want_counts, f"recv_count rank {r}")
        if use_fp8:
            sc = (scales.view(torch.uint8).to(torch.int32) << 23) if ue8m0 else scales
            sc = sc.view(torch.float32).view(L, R * M, -1).cpu()
            rows = vals.view(torch.float8_e4m3fn).cpu().float() * sc.repeat_interleave(128, dim=-1)
        else:
            rows = vals.cpu().float()
        for ll in range(L):
            n = int(want_counts[ll])
            assert torch.equal(rows[ll, :n], want_rows[ll, :n]), (r, ll)
        states.append(inv)
    ys = [(e[0] * torch.arange(1, L + 1).view(L, 1, 1)).to(torch.bfloat16).to(DEV) for e in exp]
    off = N // 2  # the combine uses the other area
    for r in range(R):
        w = case.topk_weights[r].float().contiguous().to(DEV)
        k.put_weights(w, arenas[r], off, lay)
        twins.ll_put_weights_torch(w, twin_arenas, r, off, lay)
    _sync()
    _same(big, twin_big, "arenas after put_weights")
    for r in range(R):
        k.combine_send(ys[r].contiguous(), states[r], arenas[r], off, lay, 4)
        twins.ll_combine_send_torch(ys[r], states[r], twin_arenas, r, off, lay)
    _sync()
    if CUDA:  # the GPU may fuse the weighted sum's multiply-adds: within one bf16 rounding
        assert torch.allclose(big.view(torch.bfloat16).float(), twin_big.view(torch.bfloat16).float(), rtol=1e-2)
    else:
        _same(big, twin_big, "arenas after combine_send")
    want = ref.low_latency_combine([y.cpu() for y in ys], exp, case.topk_idx, case.topk_weights)
    mags = ref.low_latency_combine(
        [y.cpu().abs() for y in ys], exp, case.topk_idx, [w.abs() for w in case.topk_weights]
    )
    for r in range(R):
        T = tokens[r]
        out = torch.full((T, H), 7.0, dtype=torch.bfloat16, device=DEV)
        wout = torch.full((T, H), 7.0, dtype=torch.bfloat16, device=DEV)
        if T:
            k.combine_reduce(arenas[r], off, lay, idxs[r].contiguous(), out)
            twins.ll_reduce_torch(twin_arenas[r], off, lay, R, idxs[r], wout)
        _sync()
        if R <= 2 or not CUDA:
            _same(out, wout, f"combine_reduce rank {r}")
        # each rank's partial sum is rounded to bf16 once: unit 2**-8 of at most sum |w| |y|
        lim = 2e-2 + 1e-2 * want[r].float().abs() + 2.0**-8 * mags[r].float()
        assert not ((out.cpu().float() - want[r].float()).abs() > lim).any(), r


def test_low_latency_send_drops_tokens_past_m():
    """More tokens naming one expert than M (the caller's bound; the kernel guards it): the rows past M are
    not stored (the area would overflow into the next expert's rows), as in the twin."""
    from deep_ep.kernels import low_latency as k
    from deep_ep.transport.nvlink.low_latency import area_layout

    M, H, E, K = 3, 128, 4, 2
    lay = area_layout(1, E, M, K, H, False, False)
    N = 2 * lay["bytes"]
    a = _Arena(torch.full((N,), 0x55, dtype=torch.uint8, device=DEV), 0, 1, N)
    twin = torch.full((N,), 0x55, dtype=torch.uint8, device=DEV)
    x = torch.randn((M + 2, H), generator=_gen(3)).to(torch.bfloat16).to(DEV)
    idx = torch.tensor([[1, -1]] * (M + 2), device=DEV)
    err, werr = torch.zeros(1, dtype=torch.int32, device=DEV), torch.zeros(1, dtype=torch.int32, device=DEV)
    k.send(x, idx, a, 0, lay, err, False, False)
    twins.ll_send_torch(x, idx, [twin], 0, 0, lay, werr, False, False)
    _sync()
    _same(a.u8, twin, "arena")
    info = a.i32[lay["info"] // 4 : lay["info"] // 4 + E * M].view(E, M)
    assert info[1].cpu().tolist() == [0 * K, 1 * K, 2 * K]  # tokens 0..M-1 of expert 1, the rest dropped


@pytest.mark.parametrize(
    "idx,bit", [([[1, 1, 2]], 1), ([[0, 4, -1]], 2), ([[0, -2, 3]], 2), ([[3, 0, -1]], 0), ([[-1, -1, 2]], 0)]
)
def test_low_latency_send_flags_invalid_ids(idx, bit):
    """An id repeated in a token (bit 1) or outside [-1, E) (bit 2, E - 1 the largest valid) is skipped and
    flagged: the counts of the kernel and its twin agree, and only valid entries are counted."""
    from deep_ep.kernels import low_latency as k
    from deep_ep.transport.nvlink.low_latency import area_layout

    lay = area_layout(1, 4, 4, 3, 128, False, False)
    N = 2 * lay["bytes"]
    a = _Arena(torch.zeros(N, dtype=torch.uint8, device=DEV), 0, 1, N)
    twin = torch.zeros(N, dtype=torch.uint8, device=DEV)
    err, werr = torch.zeros(1, dtype=torch.int32, device=DEV), torch.zeros(1, dtype=torch.int32, device=DEV)
    x = torch.ones((1, 128), dtype=torch.bfloat16, device=DEV)
    t = torch.tensor(idx, device=DEV)
    k.send(x, t, a, 0, lay, err, False, False)
    twins.ll_send_torch(x, t, [twin], 0, 0, lay, werr, False, False)
    _sync()
    assert int(err[0]) == int(werr[0]) == bit
    _same(a.u8, twin, "arena")
    assert a.i32[:4].cpu().tolist() == [int(e in idx[0]) for e in range(4)]


def _global_names(code):
    """Every global name a function's code (and the code nested in it) reads."""
    yield from code.co_names
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            yield from _global_names(const)


def test_kernel_globals_are_constexpr():
    """A number a kernel reads from its module must be a ``tl.constexpr``: the compiler refuses a plain int
    (the interpreter takes it, so only this check stands between CI and a kernel that cannot compile)."""
    import importlib
    import pkgutil

    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    import deep_ep.kernels as kernels

    jitted = (triton.runtime.jit.JITFunction, InterpretedFunction)  # compiled / under the interpreter
    checked, bad = 0, []
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"deep_ep.kernels.{info.name}")
        for name, obj in vars(module).items():
            if not isinstance(obj, jitted) or obj.fn.__module__ != module.__name__:
                continue
            checked += 1
            scope = obj.fn.__globals__
            for word in set(_global_names(obj.fn.__code__)):
                value = scope.get(word)
                if isinstance(value, (bool, int, float)) and not isinstance(value, tl.constexpr):
                    bad.append(f"{module.__name__}.{name} reads {word}={value!r}")
    assert checked >= 20, checked
    assert not bad, bad


class _FakeCompiled:
    """What ``kernel[grid](...)`` returns on a GPU, recording the lean launches."""

    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, "fn", "meta"

    def run(self, gx, gy, gz, stream, function, meta, launch_meta, enter, exit_, *args):
        self.log.append(("lean", (gx, gy, gz), stream, args))


class _FakeJit:
    """A jitted kernel's surface the launcher uses: ``params`` and ``[grid](...)`` (Triton's own launch)."""

    def __init__(self, log, names):
        import types

        self.log = log
        self.params = [types.SimpleNamespace(name=n, is_constexpr=n.isupper()) for n in names]

    def __getitem__(self, grid):
        def launch(*args, num_warps, **constexprs):
            self.log.append(("triton", grid, args, constexprs))
            return _FakeCompiled(self.log)

        return launch


def test_lean_launch_arguments(monkeypatch):
    """The lean launch (GPU path) with a stand-in for the compiled kernel: the first launch of a signature
    goes through Triton, later ones call the compiled launcher with integer pointers and the constexprs in
    the kernel's parameter order; a new dtype, a misaligned pointer, or a changed int specialisation is a
    new signature; a launcher that refuses the arguments makes Triton's own path the path from then on."""
    import types

    from deep_ep.kernels import launch as L

    log = []
    fn = _FakeJit(log, ["x_ptr", "n", "BLOCK", "out_ptr", "m", "FLAG"])
    streams = {"dev": 0}
    monkeypatch.setattr(
        torch.cuda, "current_stream", lambda *a: types.SimpleNamespace(cuda_stream=77, device_index=streams["dev"])
    )
    k = L.Launcher(fn, num_warps=4)
    k._interp = False
    bound = k.bind(dict(BLOCK=64, FLAG=True))
    x = torch.zeros(64, dtype=torch.float32)
    out = torch.zeros(64, dtype=torch.int32)
    before = L.STATS.launches
    bound((3,), x, 5, out, 32)
    assert log[-1][0] == "triton" and log[-1][2] == (x, 5, out, 32) and log[-1][3] == dict(BLOCK=64, FLAG=True)
    bound((3,), x, 7, out, 48)  # the same specialisation (5 and 7: neither 1 nor /16; 32 and 48: /16)
    assert log[-1] == ("lean", (3, 1, 1), 77, (x.data_ptr(), 7, 64, out.data_ptr(), 48, True))
    k((2, 2), x, 9, out, 16, BLOCK=64, FLAG=True)  # the keyword form, same signature
    assert log[-1] == ("lean", (2, 2, 1), 77, (x.data_ptr(), 9, 64, out.data_ptr(), 16, True))
    n = len(log)
    for args in ((x[1:], 7, out, 48), (x.double(), 7, out, 48), (x, 1, out, 48), (x, 7, out, 17)):
        bound((1,), *args)  # misaligned, another dtype, the int 1, an int not /16: each compiled anew
        assert log[-1][0] == "triton" and len(log) == n + 1, args
        n += 1
    assert L.STATS.launches - before == 7
    streams["dev"] = 1  # another GPU: its own compiled kernel (a kernel is loaded per device)
    bound((3,), x, 7, out, 48)
    assert log[-1][0] == "triton"
    bound((3,), x, 7, out, 48)
    assert log[-1][0] == "lean"

    def refuse(*a):
        raise TypeError("other launcher")

    for compiled in k._compiled.values():
        compiled.run = refuse
    bound((3,), x, 7, out, 48)
    assert log[-1][0] == "triton" and not k._lean


def test_lean_launch_yields_to_launch_hooks(monkeypatch):
    """With a launch hook set (a profiler), every launch goes through Triton's own path, which calls it."""
    import types

    from triton import knobs

    from deep_ep.kernels import launch as L

    log = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: types.SimpleNamespace(cuda_stream=1, device_index=0))
    k = L.Launcher(_FakeJit(log, ["x_ptr", "n"]), num_warps=4)
    k._interp = False
    x = torch.zeros(8)
    hook = lambda *a: None  # noqa: E731
    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):
        chain.add(hook)
        undo = lambda: chain.remove(hook)  # noqa: E731
    else:  # an older Triton: the knob is the hook itself
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", hook)
        undo = lambda: None  # noqa: E731
    try:
        for _ in range(3):
            k((1,), x, 3)
            assert log[-1][0] == "triton"
    finally:
        undo()
    k((1,), x, 3)  # unhooked: compiled once more (hooked launches keep nothing), then lean
    k((1,), x, 3)
    assert [e[0] for e in log[-2:]] == ["triton", "lean"]
