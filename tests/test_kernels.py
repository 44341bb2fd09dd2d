"""Triton kernels against the torch paths they speed up (GPU only), on fresh random inputs."""

from __future__ import annotations

import os

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.gpu(1)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "T,H,R,nb", [(1, 7, 1, 0), (37, 130, 2, 1), (513, 7168, 2, 2), (64, 2048, 8, 0), (0, 64, 2, 0)]
)
def test_reduce_rows_kernel_matches_torch(dtype, T, H, R, nb):
    from deep_ep import rows as base
    from deep_ep.kernels import reduce as kreduce

    g = torch.Generator(device="cuda").manual_seed(T * 131 + H + R)
    S = max(T * R // 2, 1)
    back = torch.randn((S + 1, H), generator=g, device="cuda").to(dtype)
    back[S] = 0
    back[0, 0] = float("nan")
    pos = torch.randint(0, S + 1, (T, R), generator=g, device="cuda")
    biases = [torch.randn((T, H), generator=g, device="cuda").to(dtype) for _ in range(nb)]
    os.environ["DEEP_EP_DISABLE_TRITON"] = "1"
    try:
        want = base.reduce_rows(back, pos, biases, dtype, lambda s, d: torch.empty(s, dtype=d, device="cuda"))
    finally:
        del os.environ["DEEP_EP_DISABLE_TRITON"]
    out = torch.full((T, H), 7.0, dtype=dtype, device="cuda")
    got = kreduce.reduce_rows(back, pos, biases, out)
    assert torch.equal(torch.nan_to_num(got, nan=123.0), torch.nan_to_num(want, nan=123.0))
    assert torch.equal(got.isnan(), want.isnan())


@cuda
@pytest.mark.gpu(1)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "T,H,R,col,n_local", [(37, 130, 2, 0, 20), (513, 7168, 2, 1, 300), (64, 2048, 4, 2, 0), (5, 9, 3, 1, 4)]
)
def test_reduce_rows_kernel_local_rows_and_absent(dtype, T, H, R, col, n_local):
    """One column read from the rank's own rows, -1 entries absent: kernel equals the torch path."""
    from deep_ep import rows as base
    from deep_ep.kernels import reduce as kreduce

    g = torch.Generator(device="cuda").manual_seed(T + H * 7 + R + col)
    S = max(T * R // 2, 1)
    back = torch.randn((S, H), generator=g, device="cuda").to(dtype)
    local = torch.randn((n_local, H), generator=g, device="cuda").to(dtype)
    pos = torch.randint(0, S, (T, R), generator=g, device="cuda")
    pos[:, col] = torch.randint(0, max(n_local, 1), (T,), generator=g, device="cuda") if n_local else -1
    pos[torch.rand((T, R), generator=g, device="cuda") < 0.3] = -1
    biases = [torch.randn((T, H), generator=g, device="cuda").to(dtype)]
    os.environ["DEEP_EP_DISABLE_TRITON"] = "1"
    try:
        want = base.reduce_rows(
            back, pos, biases, dtype, lambda s, d: torch.empty(s, dtype=d, device="cuda"), local=local, local_col=col
        )
    finally:
        del os.environ["DEEP_EP_DISABLE_TRITON"]
    # The torch path itself, against a plain float64 sum.
    ref = biases[0].double().clone()
    for j in range(R):
        src = local if j == col else back
        p = pos[:, j]
        rows = src.double()[p.clamp(min=0)] if src.size(0) else torch.zeros_like(ref)
        ref += torch.where((p >= 0).unsqueeze(1), rows, torch.zeros_like(rows))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(want.double(), ref, atol=tol, rtol=tol)
    out = torch.full((T, H), 7.0, dtype=dtype, device="cuda")
    got = kreduce.reduce_rows(back, pos, biases, out, local=local, local_col=col)
    assert torch.equal(got, want)


SCATTER_CASES = [(1792, torch.int64, 24), (7, torch.int32, 3), (40, torch.int16, 1), (3, torch.uint8, 5)]


def check_scatter_kernels(device: str, W: int, dtype: torch.dtype, nprog: int) -> None:
    """The device path's three kernels (kernels/scatter.py) against plain torch indexing, with the
    "peers" as regions of one local tensor (the kernels only see a region and distances)."""
    from deep_ep.kernels import scatter

    g = torch.Generator(device=device).manual_seed(W * 7 + nprog)
    R, me, T, cap = 3, 1, 37, 64  # cap * W is a multiple of 16 words: aligned distances

    def rnd(*shape):
        return torch.randint(0, 100, shape, generator=g, device=device).to(dtype)

    regions = rnd(R, cap, W)
    delta = torch.tensor([(d - me) * cap * W for d in range(R)], dtype=torch.int64, device=device)
    src = rnd(T, W)
    mask = torch.rand((T, R), generator=g, device=device) < 0.6
    slot = torch.full((T, R), -1, dtype=torch.int64, device=device)
    for d in range(R):  # distinct slots per destination, some beyond the region
        perm = torch.randperm(cap + 4, generator=g, device=device)[:T]
        slot[:, d] = torch.where(mask[:, d], perm, -1)
    out = rnd(cap + 8, W)
    want_regions, want_out = regions.clone(), out.clone()
    for d in range(R):
        for t in range(T):
            s = int(slot[t, d])
            if d == me and 0 <= s < out.size(0):
                want_out[s] = src[t]
            elif d != me and 0 <= s < cap:
                want_regions[d, s] = src[t]
    scatter.scatter_rows(src, slot, out, regions[me], delta, me, nprog)
    _sync(device)
    assert torch.equal(regions, want_regions) and torch.equal(out, want_out)

    dst = rnd(cap - 3, W)
    bounds = torch.tensor([41, 9, 20], dtype=torch.int64, device=device)  # n, own rows [lo, hi)
    want = dst.clone()
    want[:9] = regions[me, :9]
    want[20:41] = regions[me, 20:41]
    want[41:] = 0
    scatter.copy_out(regions[me], dst, bounds, nprog)
    _sync(device)
    assert torch.equal(dst, want)

    x = rnd(50, W)
    table = torch.tensor([[3, 10, 5], [0, 0, 0], [20, 30, 40]], dtype=torch.int64, device=device)
    want_regions = regions.clone()
    want_regions[0, 5:15] = x[3:13]
    want_regions[2, 40:63] = x[20:43]  # rows from cap - 1 on are not written
    scatter.return_blocks(x, table, regions[me][: cap - 1], delta, me, nprog)
    _sync(device)
    assert torch.equal(regions, want_regions)


@cuda
@pytest.mark.gpu(1)
@pytest.mark.parametrize("W,dtype,nprog", SCATTER_CASES)
def test_scatter_kernels_match_torch(W, dtype, nprog):
    check_scatter_kernels("cuda", W, dtype, nprog)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def check_scatter_kernels_multi(device: str, nprog: int) -> None:
    """One launch moving several row tensors (different word dtypes and widths, one empty) equals one
    launch per tensor (each checked against torch by :func:`check_scatter_kernels`)."""
    from deep_ep.kernels import scatter

    g = torch.Generator(device=device).manual_seed(11 + nprog)
    R, me, T, cap = 3, 2, 29, 48
    specs = [(1792, torch.int64), (7, torch.int32), (0, torch.int64), (40, torch.int16), (3, torch.uint8)]

    def rnd(*shape, dtype):
        return torch.randint(0, 100, shape, generator=g, device=device).to(dtype)

    srcs = [rnd(T, W, dtype=dt) for W, dt in specs]
    regions = [rnd(R, cap, W, dtype=dt) for W, dt in specs]
    deltas = [torch.tensor([(d - me) * cap * W for d in range(R)], dtype=torch.int64, device=device) for W, _ in specs]
    slot = torch.full((T, R), -1, dtype=torch.int64, device=device)
    for d in range(R):
        perm = torch.randperm(cap + 4, generator=g, device=device)[:T]
        slot[:, d] = torch.where(torch.rand((T,), generator=g, device=device) < 0.6, perm, -1)
    outs = [rnd(cap + 8, W, dtype=dt) for W, dt in specs]
    one_regions, one_outs = [r.clone() for r in regions], [o.clone() for o in outs]
    for s_, o_, r_, d_ in zip(srcs, one_outs, one_regions, deltas):
        scatter.scatter_rows(s_, slot, o_, r_[me], d_, me, nprog)
    scatter.scatter_rows(srcs, slot, outs, [r[me] for r in regions], deltas, me, nprog)
    _sync(device)
    assert all(torch.equal(a, b) for a, b in zip(regions + outs, one_regions + one_outs))

    bounds = torch.tensor([30, 4, 11], dtype=torch.int64, device=device)
    dsts = [rnd(cap - 5, W, dtype=dt) for W, dt in specs]
    one = [d.clone() for d in dsts]
    for r_, d_ in zip(regions, one):
        scatter.copy_out(r_[me], d_, bounds, nprog)
    scatter.copy_out([r[me] for r in regions], dsts, bounds, nprog)
    _sync(device)
    assert all(torch.equal(a, b) for a, b in zip(dsts, one))

    table = torch.tensor([[3, 10, 5], [20, 9, 30], [0, 0, 0]], dtype=torch.int64, device=device)
    xs = [rnd(40, W, dtype=dt) for W, dt in specs]
    one_regions = [r.clone() for r in regions]
    for x_, r_, d_ in zip(xs, one_regions, deltas):
        scatter.return_blocks(x_, table, r_[me][: cap - 1], d_, me, nprog)
    scatter.return_blocks(xs, table, [r[me][: cap - 1] for r in regions], deltas, me, nprog)
    _sync(device)
    assert all(torch.equal(a, b) for a, b in zip(regions, one_regions))


@cuda
@pytest.mark.gpu(1)
@pytest.mark.parametrize("nprog", [1, 7, 24])
def test_scatter_kernels_multi_match_single(nprog):
    check_scatter_kernels_multi("cuda", nprog)


def check_plan_kernel(
    device: str, T: int, R: int, rank: int, seed: int, disagree: bool, over: bool, bad_ids: bool = False
) -> None:
    """The fused device-plan kernel against the torch path (layout.device_layout, the prefix matrix and
    DeferredChecks' verdict) on a random mask and random published metadata. Also run by
    ``scripts/plan_interpret.py`` in the Triton interpreter."""
    from deep_ep import layout
    from deep_ep.agreement import _H_E, _H_ERR, _H_WORST, _HEADER
    from deep_ep.kernels import plan as kplan
    from deep_ep.plans import _FIELDS, torch_verdict

    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand((T, R), generator=g) < 0.6).to(device)
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
    meta = meta.to(device)
    counts = meta[:, _HEADER : _HEADER + R].clone()
    want = layout.device_layout(mask, counts, rank)
    dl, rpm, verdict = kplan.device_plan(mask, meta, rank, _HEADER, _FIELDS, _H_ERR, _H_WORST, _H_E)
    for k in ("slot", "send_pos", "combine_pos", "recv", "ret"):
        assert torch.equal(getattr(dl, k).cpu(), getattr(want, k).cpu()), k
    assert torch.equal(rpm.cpu(), torch.cumsum(counts, dim=0).to(torch.int32).cpu())
    assert verdict.cpu().tolist() == torch_verdict(meta, counts, rank).cpu().tolist()
    assert verdict.cpu().tolist() == [int(disagree and R > 1), int(over), int(bad_ids)]


@cuda
@pytest.mark.gpu(1)
@pytest.mark.parametrize("T,R,rank", [(0, 2, 0), (1, 1, 0), (37, 2, 1), (1500, 3, 2), (5000, 4, 1), (300, 8, 7)])
@pytest.mark.parametrize(
    "disagree,over,bad_ids", [(False, False, False), (True, False, False), (False, True, False), (False, False, True)]
)
def test_plan_kernel_matches_torch(T, R, rank, disagree, over, bad_ids):
    check_plan_kernel("cuda", T, R, rank, T * 7 + R, disagree, over, bad_ids)


@pytest.mark.parametrize("R,bad", [(1, False), (3, False), (3, True), (4, True)])
def test_torch_verdict_of_id_ranges(R, bad):
    """The torch verdict (the CPU twin of the plan kernel's) flags an id range outside [-1, E) only."""
    from deep_ep.agreement import _H_E, _HEADER
    from deep_ep.plans import torch_verdict

    meta = torch.zeros((R, _HEADER + R + 2), dtype=torch.int64)
    meta[:, _H_E] = 8
    meta[:, _HEADER + R] = -1
    meta[:, _HEADER + R + 1] = 7
    if bad:
        meta[R - 1, _HEADER + R + (1 if R % 2 else 0)] = 8 if R % 2 else -2
    got = torch_verdict(meta, meta[:, _HEADER : _HEADER + R], 0).tolist()
    assert got == [0, 0, int(bad)]
    meta[:, _H_E] = -1  # no top-k in the call: no range to check
    assert torch_verdict(meta, meta[:, _HEADER : _HEADER + R], 0).tolist() == [0, 0, 0]


def check_layout_kernel(device: str, T: int, K: int, E: int, R: int, P: int, seed: int, mode: str) -> None:
    """The one-launch dispatch layout against layout.dispatch_layout_torch on random ids with -1 entries
    (``mode``: ``'bad'`` adds ids outside [-1, E), ``'one'`` sends every token to one expert). Also run
    by ``scripts/plan_interpret.py`` in the Triton interpreter."""
    from deep_ep import layout
    from deep_ep.kernels import layout as klayout

    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, E, (T, K), generator=g)
    if mode == "bad":
        idx[::3, 0] = E + 2
        idx[1::5, -1] = -7
    if mode == "one":
        idx[:] = E - 1
    idx = idx.to(device)
    nodes = R // P if P < R else 0
    want = layout.dispatch_layout_torch(idx, E, R, P if P < R else None)
    got = klayout.dispatch_layout(idx, E, R, nodes, P)
    for a, b, name in zip(got, want, ("per rank", "per node", "per expert", "is_token_in_rank")):
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        assert a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()), name


LAYOUT_CASES = [
    (0, 8, 16, 2, 2, 0, "rand"),
    (1, 1, 4, 1, 1, 1, "rand"),
    (37, 8, 64, 2, 1, 2, "bad"),
    (300, 6, 256, 8, 4, 3, "rand"),
    (129, 8, 288, 4, 2, 4, "one"),
    (50, 3, 12, 6, 3, 5, "bad"),
    (4096, 8, 256, 2, 2, 6, "rand"),
    (500, 8, 128, 64, 8, 7, "rand"),
]


@cuda
@pytest.mark.gpu(1)
@pytest.mark.parametrize("T,K,E,R,P,seed,mode", LAYOUT_CASES)
def test_layout_kernel_matches_torch(T, K, E, R, P, seed, mode):
    check_layout_kernel("cuda", T, K, E, R, P, seed, mode)


def check_localize_kernel(device: str, N: int, K: int, rank: int, L: int, n_valid: int, weights: bool) -> None:
    """The fused localise-and-mask kernel against layout.localize_topk plus the valid-row masking."""
    from deep_ep import layout
    from deep_ep.kernels import plan as kplan

    g = torch.Generator().manual_seed(N * 31 + K + rank)
    idx = torch.randint(-1, 4 * max(L, 1), (N, K), generator=g).to(device)
    w = torch.randn((N, K), generator=g).to(device) if weights else None
    if weights and N:
        w[0, 0] = float("nan")
    got_i, got_w = kplan.localize_rows(idx, w, torch.tensor([n_valid], device=device), rank, L)
    want_i, want_w = layout.localize_topk(idx, w, rank, L)
    valid = (torch.arange(N, device=device) < n_valid).unsqueeze(1)
    want_i = torch.where(valid, want_i, -1)
    assert torch.equal(got_i, want_i)
    if weights:
        want_w = torch.where(valid, want_w, 0.0)
        assert torch.equal(torch.nan_to_num(got_w, nan=9.0), torch.nan_to_num(want_w, nan=9.0))
        assert torch.equal(got_w.isnan(), want_w.isnan())
    else:
        assert got_w is None


@cuda
@pytest.mark.gpu(1)
@pytest.mark.parametrize(
    "N,K,rank,L,n_valid,weights",
    [(0, 8, 0, 4, 0, True), (37, 3, 1, 4, 30, True), (2048, 8, 3, 5, 2048, False), (100, 1, 0, 1, 0, True)],
)
def test_localize_kernel_matches_torch(N, K, rank, L, n_valid, weights):
    check_localize_kernel("cuda", N, K, rank, L, n_valid, weights)
