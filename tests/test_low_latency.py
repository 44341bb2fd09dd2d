"""Low-latency mode (docs/api.md, low-latency mode, deep_ep/low_latency.py) against the reference: CPU ranks (collective) and
2 GPUs (nvlink, collective), CUDA-graph capture on nvlink, and its errors."""

from __future__ import annotations

import pytest
import torch

import deep_ep
from deep_ep import reference as ref
from deep_ep.compress import make_codec
from tests._cases import assert_same, device, get_buffer, make_case


def assert_ll_combine(out, ys, exp, topk_idx, topk_weights, rank, what):
    """A low-latency combine against the reference: within bf16 tolerance, plus one bf16 rounding (unit
    2**-8) of each rank's partial sum, which the nvlink kernels round before it travels (bounded by the
    reference combine of |y| with |w|)."""
    want = ref.low_latency_combine(ys, exp, topk_idx, topk_weights)[rank].float()
    mag = ref.low_latency_combine([y.abs() for y in ys], exp, topk_idx, [w.abs() for w in topk_weights])[rank]
    err = (out.float().cpu() - want).abs()
    lim = 2e-2 + 1e-2 * want.abs() + 2.0**-8 * mag.float()
    assert not (err > lim).any(), f"{what}: off the reference by {float((err - lim).max()):.3g} beyond the bound"


def _decoded(recv_x, use_fp8):
    """recv_x as float32 [L, R*M, H] (fp8 values times their per-128 scales)."""
    if not use_fp8:
        return recv_x.float()
    vals, scales = recv_x
    if scales.dtype == torch.int32:  # UE8M0: four exponent bytes per int32
        scales = (scales.contiguous().view(torch.uint8).to(torch.int32) << 23).view(torch.float32)
    return vals.float() * scales.repeat_interleave(128, dim=-1)


def _fp8_error_bound(raw):
    """Per-element bound on ``|dequantised - x|`` for DeepEP's fp8 cast of float32 rows ``raw`` [..., H]:
    e4m3 keeps 3 mantissa bits, so a normal value rounds within ``|x| / 16``; a subnormal one within half
    the subnormal step, ``2**-10 * scale``, with ``scale <= 2 * amax / 448`` (amax of its 128 values; the
    factor 2 covers a scale rounded up to a power of two). Plus 1e-6 * amax for float32 rounding."""
    amax = raw.unflatten(-1, (-1, 128)).abs().amax(dim=-1, keepdim=True).clamp(min=1e-4)
    amax = amax.expand(*amax.shape[:-1], 128).flatten(-2)
    return raw.abs() / 16 + amax * (2.0**-9 / 448 + 1e-6)


def rank_low_latency(
    rank,
    R,
    backend,
    use_fp8,
    ue8m0,
    hook,
    seed,
    pattern="random",
    tokens=None,
    M=24,
    H=512,
    epr=4,
    topk=3,
    round_scale=False,
):
    dev = device()
    E = epr * R
    tokens = (list(tokens) + [M] * R)[:R] if tokens else [M, max(M - 7, 1), 3, 0][:R]  # = M and < M, per rank
    case = make_case(seed, R, hidden=H, topk=topk, num_experts=E, tokens=tokens, neg_frac=0.2, pattern=pattern)
    for idx, w in zip(case.topk_idx, case.topk_weights):
        w[idx < 0] = float("nan")  # skipped entries: their weights must not count
    buf = get_buffer(backend, **({"ranks_per_node": max(R // 2, 1)} if backend == "hierarchical" else {}))
    codec = make_codec(8, H, round_scale=round_scale, use_ue8m0=ue8m0) if use_fp8 else None
    sent = [codec.decode(codec.encode(x), torch.float32) if codec else x.float() for x in case.xs]
    exp = ref.low_latency_dispatch(sent, case.topk_idx, M, E)
    raw = ref.low_latency_dispatch([x.float() for x in case.xs], case.topk_idx, M, E)[rank][0] if use_fp8 else None
    L = E // R
    stats = torch.zeros(L, dtype=torch.int32, device=dev)
    x, idx, w = case.xs[rank].to(dev), case.topk_idx[rank].to(dev), case.topk_weights[rank].to(dev)
    for rep in range(2):  # two calls on one Buffer: nothing carried over
        recv_x, count, handle, event, hk = buf.low_latency_dispatch(
            x,
            idx,
            M,
            E,
            cumulative_local_expert_recv_stats=stats,
            use_fp8=use_fp8,
            use_ue8m0=ue8m0,
            round_scale=round_scale,
            return_recv_hook=hook,
        )
        assert (hk is not None) == hook
        if hook:
            hk()
        rows, counts, _ = exp[rank]
        assert_same(count.cpu(), counts, "recv_count")
        got = _decoded(recv_x, use_fp8).cpu()
        assert got.shape == (L, R * M, H)
        for l in range(L):
            n = int(counts[l])
            assert_same(got[l, :n], rows[l, :n], f"expert {l} rows, rep {rep}")
            if use_fp8:  # and within fp8 error of the bf16 input itself
                over = (got[l, :n] - raw[l, :n]).abs() - _fp8_error_bound(raw[l, :n])
                assert not (over > 0).any(), (
                    f"expert {l}: fp8 rows beyond the fp8 bound of the bf16 input by {over.max():.3g}, rep {rep}"
                )
        if use_fp8 and round_scale and not ue8m0:  # float32 scales, each a power of two
            valid = torch.cat([recv_x[1][l, : int(counts[l])].cpu() for l in range(L)])
            assert valid.numel() and (torch.frexp(valid).mantissa == 0.5).all(), "round_scale: scales not 2**k"
        # a toy expert: scale rows by (local expert + 1)
        y = (got * torch.arange(1, L + 1).view(L, 1, 1)).to(torch.bfloat16).to(dev)
        ys = [(e[0] * torch.arange(1, L + 1).view(L, 1, 1)).to(torch.bfloat16) for e in exp]
        out, _, hk2 = buf.low_latency_combine(y, idx, w, handle, return_recv_hook=hook)
        if hook:
            hk2()
        assert_ll_combine(out, ys, exp, case.topk_idx, case.topk_weights, rank, "combine")
        zbuf = buf.get_next_low_latency_combine_buffer(handle)
        zbuf.copy_(y)
        into = torch.empty((tokens[rank], H), dtype=torch.bfloat16, device=dev)
        out2, _, _ = buf.low_latency_combine(None, idx, w, handle, zero_copy=True, out=into)
        assert out2.data_ptr() == into.data_ptr()
        assert_same(out2.cpu(), out.cpu(), "zero_copy combine into out=")
    assert_same(stats.cpu(), 2 * exp[rank][1], "cumulative_local_expert_recv_stats")


@pytest.mark.parametrize(
    "use_fp8,ue8m0,hook,seed", [(True, False, False, 1), (False, False, True, 2), (True, True, False, 3)]
)
def test_low_latency_cpu(rank_pool, use_fp8, ue8m0, hook, seed):
    rank_pool(2).run(rank_low_latency, "collective", use_fp8, ue8m0, hook, seed)


def test_low_latency_cpu_round_scale(rank_pool):
    """fp8 dispatch with ``round_scale=True``: rows equal the codec's power-of-two-scale round trip, scales
    are powers of two, rows within fp8 error of the bf16 input."""
    rank_pool(2).run(rank_low_latency, "collective", True, False, False, 13, round_scale=True)


def test_low_latency_cpu_4_ranks(rank_pool):
    rank_pool(4).run(rank_low_latency, "collective", True, False, False, 4)


def test_low_latency_hierarchical_cpu(rank_pool):
    """The low-latency calls on the hierarchical transport (4 ranks as 2 emulated nodes)."""
    rank_pool(4).run(rank_low_latency, "hierarchical", True, False, False, 8)


def _tagged_x(rank, T, H):
    """DeepEP's own test inputs: a row holds -(its rank + 1) except its last 128 values, which hold its token
    index + 1. Both are integers of at most 4 significant bits (M <= 16, R <= 4), exact in bf16 and in fp8
    with any per-128 scale (amax / 448 or a power of two), so each received row names its source exactly.
    (``make_case(rank_valued=True)``'s ``rank + t / 1024`` loses the token index in bf16 for rank >= 1; it is
    used here for the routing only.)"""
    x = torch.full((T, H), -(rank + 1.0))
    x[:, -128:] = torch.arange(1, T + 1, dtype=torch.float32).unsqueeze(1)
    return x.to(torch.bfloat16)


def rank_low_latency_tagged(rank, R, backend, use_fp8, round_scale, ue8m0, seed, M=16, H=512, epr=3, topk=3):
    """Every valid row of expert ``e`` is the token sent, in source-rank then token order, identified by its
    rank and token tags alone (no reference); combine of ``(e + 1) * row`` gives ``x * sum_k w_k (e_k + 1)``."""
    assert M <= 16 and R <= 4  # the tags stay exact (see _tagged_x)
    dev = device()
    E, L = epr * R, epr
    tokens = [M, M - 5, 4, 0][:R]  # = M, < M, a rank with no tokens at 4 ranks
    case = make_case(seed, R, hidden=H, topk=topk, num_experts=E, tokens=tokens, neg_frac=0.2, rank_valued=True)
    xs = [_tagged_x(s, T, H) for s, T in enumerate(tokens)]
    for idx, w in zip(case.topk_idx, case.topk_weights):
        w[idx < 0] = float("nan")  # skipped entries: their weights must not count
    buf = get_buffer(backend)
    x, idx, w = xs[rank].to(dev), case.topk_idx[rank].to(dev), case.topk_weights[rank].to(dev)
    recv_x, count, handle, _, _ = buf.low_latency_dispatch(
        x, idx, M, E, use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=ue8m0
    )
    got, count = _decoded(recv_x, use_fp8).cpu(), count.cpu()
    assert got.shape == (L, R * M, H)
    total = 0
    for l in range(L):
        e = rank * L + l
        src = [(s, t) for s in range(R) for t in (case.topk_idx[s] == e).any(dim=1).nonzero()[:, 0].tolist()]
        assert int(count[l]) == len(src), f"expert {e}: recv_count {int(count[l])}, {len(src)} tokens chose it"
        total += len(src)
        rows = got[l, : len(src)]
        want_rank = torch.tensor([-(s + 1.0) for s, _ in src]).unsqueeze(1).expand(-1, H - 128)
        want_token = torch.tensor([t + 1.0 for _, t in src]).unsqueeze(1).expand(-1, 128)
        torch.testing.assert_close(
            rows[:, :-128], want_rank, rtol=1e-5, atol=0, msg=lambda m: f"expert {e}: rows' source-rank tags: {m}"
        )
        torch.testing.assert_close(
            rows[:, -128:], want_token, rtol=1e-5, atol=0, msg=lambda m: f"expert {e}: rows' token tags: {m}"
        )
    assert total > 0 or not sum(tokens), "nothing received: the case tests nothing"
    if use_fp8 and round_scale and not ue8m0:
        sc = torch.cat([recv_x[1][l, : int(count[l])].cpu() for l in range(L)])
        assert (torch.frexp(sc).mantissa == 0.5).all(), "round_scale=True: scales are not powers of two"
    # toy expert: row * (global expert id + 1); exact in bf16 (integers <= 256)
    y = (got * (rank * L + torch.arange(1, L + 1, dtype=torch.float32)).view(L, 1, 1)).to(torch.bfloat16)
    out, _, _ = buf.low_latency_combine(y.to(dev), idx, w, handle)
    ti, tw = case.topk_idx[rank], case.topk_weights[rank]
    coef = torch.where(ti >= 0, tw * (ti + 1).float(), torch.zeros_like(tw)).sum(dim=1, keepdim=True)
    assert_same(out.cpu(), (xs[rank].float() * coef).to(torch.bfloat16), "combine of tagged rows", atol=1e-2, rtol=1e-2)


_TAGGED = [  # R, use_fp8, round_scale, ue8m0
    (2, False, False, False),
    (2, True, False, False),
    (2, True, True, False),
    (2, True, True, True),
    (4, True, False, False),
]


@pytest.mark.parametrize("R,use_fp8,round_scale,ue8m0", _TAGGED)
def test_low_latency_tagged_cpu(rank_pool, R, use_fp8, round_scale, ue8m0):
    rank_pool(R).run(rank_low_latency_tagged, "collective", use_fp8, round_scale, ue8m0, 30 + R)


@pytest.mark.gpu
@pytest.mark.parametrize("R,use_fp8,round_scale,ue8m0", _TAGGED[:4])
def test_low_latency_tagged_gpu(rank_pool, R, use_fp8, round_scale, ue8m0):
    rank_pool(R, backend="nccl").run(rank_low_latency_tagged, "nvlink", use_fp8, round_scale, ue8m0, 40)


def rank_low_latency_modes(rank, R, backend, use_fp8, seed, M=16, H=256, epr=2, topk=2):
    """With the same inputs, plain, ``return_recv_hook=True`` and ``async_finish=True`` calls give the same
    bits (dispatch rows, counts, combine), the async events can be waited on, and calls after
    ``clean_low_latency_buffer`` stay correct (against the reference)."""
    dev = device()
    E, L = epr * R, epr
    buf = get_buffer(backend)
    codec = make_codec(8, H) if use_fp8 else None

    def inputs(s):
        case = make_case(s, R, hidden=H, topk=topk, num_experts=E, tokens=[M, M - 3, 5, 1][:R], neg_frac=0.2)
        for idx, w in zip(case.topk_idx, case.topk_weights):
            w[idx < 0] = float("nan")
        return case, case.xs[rank].to(dev), case.topk_idx[rank].to(dev), case.topk_weights[rank].to(dev)

    def call(x, idx, w, hook=False, async_finish=False):
        recv_x, count, handle, ev, hk = buf.low_latency_dispatch(
            x, idx, M, E, use_fp8=use_fp8, async_finish=async_finish, return_recv_hook=hook
        )
        assert isinstance(ev, deep_ep.EventOverlap) and (hk is not None) == hook
        if hook:
            hk()
        if async_finish:  # a CUDA event on GPU; nothing to wait for on CPU
            assert (ev.event is not None) == (dev.type == "cuda")
            ev.current_stream_wait()
        got = _decoded(recv_x, use_fp8)
        y = (got * 3).to(torch.bfloat16)  # toy expert
        out, ev2, hk2 = buf.low_latency_combine(y, idx, w, handle, async_finish=async_finish, return_recv_hook=hook)
        assert isinstance(ev2, deep_ep.EventOverlap) and (hk2 is not None) == hook
        if hook:
            hk2()
        if async_finish:
            assert (ev2.event is not None) == (dev.type == "cuda")
            with ev2:
                pass
        count = count.cpu()
        return count, [got[l, : int(count[l])].cpu() for l in range(L)], out.cpu()

    def same(a, b, what):
        assert_same(a[0], b[0], f"{what}: recv_count")
        for l in range(L):
            assert torch.equal(a[1][l], b[1][l]), f"{what}: expert {l}'s rows differ"
        assert torch.equal(a[2].view(torch.int16), b[2].view(torch.int16)), f"{what}: combine differs"

    def check_ref(case, res, what):
        sent = [codec.decode(codec.encode(x), torch.float32) if codec else x.float() for x in case.xs]
        exp = ref.low_latency_dispatch(sent, case.topk_idx, M, E)
        assert_same(res[0], exp[rank][1], f"{what}: recv_count")
        assert int(res[0].sum()) > 0, f"{what}: nothing received, the case tests nothing"
        for l in range(L):
            assert_same(res[1][l], exp[rank][0][l, : int(exp[rank][1][l])], f"{what}: expert {l} rows")
        assert_ll_combine(
            res[2],
            [(e[0] * 3).to(torch.bfloat16) for e in exp],
            exp,
            case.topk_idx,
            case.topk_weights,
            rank,
            f"{what}: combine",
        )

    buf.clean_low_latency_buffer(M, H, E)  # DeepEP: clean before first use
    case, x, idx, w = inputs(seed)
    plain = call(x, idx, w)
    check_ref(case, plain, "plain")
    same(call(x, idx, w, hook=True), plain, "return_recv_hook=True vs plain")
    same(call(x, idx, w, async_finish=True), plain, "async_finish=True vs plain")
    buf.clean_low_latency_buffer(M, H, E)
    case2, x2, idx2, w2 = inputs(seed + 1)
    check_ref(case2, call(x2, idx2, w2, hook=True), "after clean_low_latency_buffer (hook)")
    buf.clean_low_latency_buffer(M, H, E)
    same(call(x, idx, w, async_finish=True), plain, "after clean_low_latency_buffer (async)")


@pytest.mark.parametrize("use_fp8", [True, False])
def test_low_latency_modes_cpu(rank_pool, use_fp8):
    rank_pool(2).run(rank_low_latency_modes, "collective", use_fp8, 50)


@pytest.mark.gpu
@pytest.mark.parametrize("use_fp8", [True, False])
def test_low_latency_modes_gpu(rank_pool, use_fp8):
    rank_pool(2, backend="nccl").run(rank_low_latency_modes, "nvlink", use_fp8, 51)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "backend,use_fp8,ue8m0,hook,round_scale",
    [
        ("nvlink", True, False, False, False),
        ("nvlink", False, False, True, False),
        ("nvlink", True, True, False, False),
        ("collective", True, False, True, False),
        ("nvlink", True, False, True, True),
    ],
)
def test_low_latency_gpu(rank_pool, backend, use_fp8, ue8m0, hook, round_scale):
    rank_pool(2, backend="nccl").run(rank_low_latency, backend, use_fp8, ue8m0, hook, 5, round_scale=round_scale)


def rank_low_latency_errors(rank, R):
    buf = get_buffer()
    x = torch.zeros((5, 256), dtype=torch.bfloat16)
    idx = torch.tensor([[0, 1]] * 5, dtype=torch.int64)
    with pytest.raises(deep_ep.DeepEPInputError, match="same expert twice"):
        buf.low_latency_dispatch(x, torch.zeros((5, 2), dtype=torch.int64), 8, 2 * R)
    with pytest.raises(deep_ep.DeepEPInputError, match="more than num_max_dispatch_tokens_per_rank"):
        buf.low_latency_dispatch(x, idx, 4, 2 * R)
    with pytest.raises(deep_ep.DeepEPInputError, match="multiple of the number of ranks"):
        buf.low_latency_dispatch(x, idx, 8, 2 * R + 1)
    with pytest.raises(deep_ep.DeepEPTypeError, match="bfloat16"):
        buf.low_latency_dispatch(x.float(), idx, 8, 2 * R)
    with pytest.raises(deep_ep.DeepEPInputError, match="divisible by 128"):
        buf.low_latency_dispatch(torch.zeros((5, 200), dtype=torch.bfloat16), idx, 8, 2 * R)
    with pytest.raises(deep_ep.DeepEPInputError, match="exclusive"):
        buf.low_latency_dispatch(x, idx, 8, 2 * R, async_finish=True, return_recv_hook=True)
    _, _, h, _, _ = buf.low_latency_dispatch(x, idx, 8, 2 * R)
    y = torch.zeros((2, 8 * R, 256), dtype=torch.bfloat16)
    with pytest.raises(deep_ep.DeepEPInputError, match="use_logfmt"):
        buf.low_latency_combine(y, idx, torch.ones(5, 2), h, use_logfmt=True)
    with pytest.raises(deep_ep.DeepEPInputError, match=r"bfloat16 \[2, "):
        buf.low_latency_combine(y[:, :3], idx, torch.ones(5, 2), h)
    with pytest.raises(deep_ep.DeepEPInputError, match="get_next_low_latency_combine_buffer"):
        buf.low_latency_combine(None, idx, torch.ones(5, 2), h, zero_copy=True)
    # a wrong hidden size on combine (expert outputs or out=) raises naming the dispatched shape
    with pytest.raises(
        deep_ep.DeepEPInputError,
        match=rf"bfloat16 \[2, {8 * R}, 256\], got torch.bfloat16 "
        rf"\[2, {8 * R}, 128\]",
    ):
        buf.low_latency_combine(y[..., :128].contiguous(), idx, torch.ones(5, 2), h)
    with pytest.raises(deep_ep.DeepEPInputError, match=r"out must be bfloat16 \[5, 256\]"):
        buf.low_latency_combine(y, idx, torch.ones(5, 2), h, out=torch.empty((5, 512), dtype=torch.bfloat16))
    out, _, _ = buf.low_latency_combine(y, idx, torch.ones(5, 2), h)  # the Buffer still works
    assert out.shape == (5, 256) and not out.float().any()
    # clean_low_latency_buffer: its arguments are checked; valid ones leave the Buffer usable
    for bad in ((8, 256, 2 * R + 1), (0, 256, 2 * R), (8, 0, 2 * R), (8, 256, 0), (8, 256, -2 * R), (8.0, 256, 2 * R)):
        with pytest.raises(deep_ep.DeepEPInputError, match="clean_low_latency_buffer"):
            buf.clean_low_latency_buffer(*bad)
            pytest.fail(f"clean_low_latency_buffer{bad} did not raise")
    assert buf.clean_low_latency_buffer(8, 256, 2 * R) is None
    assert buf.get_low_latency_rdma_size_hint(128, 7168, 2, 288) > 0


def test_low_latency_errors(rank_pool):
    rank_pool(2).run(rank_low_latency_errors)


def rank_low_latency_graph(rank, R):
    """Capture dispatch -> a toy expert -> combine once; replay 10 times on fresh data and routing; each
    replay matches the eager calls."""
    dev = device()
    M, H, E = 32, 1024, 8
    buf = get_buffer("nvlink")
    case = make_case(7, R, hidden=H, topk=4, num_experts=E, tokens=[M] * R)
    x_s, idx_s, w_s = (
        case.xs[rank].to(dev).clone(),
        case.topk_idx[rank].to(dev).clone(),
        case.topk_weights[rank].to(dev).clone(),
    )
    L = E // R

    def step():
        (vals, scales), count, handle, _, _ = buf.low_latency_dispatch(x_s, idx_s, M, E)
        y = (
            vals.float() * scales.repeat_interleave(128, dim=-1) * torch.arange(1, L + 1, device=dev).view(L, 1, 1)
        ).to(torch.bfloat16)
        return count, buf.low_latency_combine(y, idx_s, w_s, handle)[0]

    from tests.test_graph import _capture

    g, (count_s, out_s) = _capture(step)
    for trial in range(10):
        fresh = make_case(100 + trial, R, hidden=H, topk=4, num_experts=E, tokens=[M] * R)
        x_s.copy_(fresh.xs[rank].to(dev))
        idx_s.copy_(fresh.topk_idx[rank].to(dev))
        w_s.copy_(fresh.topk_weights[rank].to(dev))
        g.replay()
        torch.cuda.synchronize()
        count_e, out_e = step()  # eager, same inputs
        torch.cuda.synchronize()
        assert_same(count_s, count_e, f"replayed recv_count, trial {trial}")
        assert_same(out_s, out_e, f"replayed combine, trial {trial}")


@pytest.mark.gpu
def test_low_latency_graph(rank_pool):
    rank_pool(2, backend="nccl").run(rank_low_latency_graph)


@pytest.mark.gpu(1)
@pytest.mark.parametrize("use_fp8,ue8m0", [(True, False), (False, False), (True, True)])
def test_low_latency_one_gpu(rank_pool, use_fp8, ue8m0):
    """One rank on one GPU: the nvlink transport's device path, the Triton codec and the layout, without a
    peer (the two-GPU tests above cover the stores between GPUs)."""
    rank_pool(1, backend="nccl").run(rank_low_latency, "nvlink", use_fp8, ue8m0, False, 6)


_SHAPES = [  # use_fp8, ue8m0, hook, pattern, tokens, M, H, experts per rank, top-k
    (True, False, True, "random", None, 24, 512, 4, 3),
    (True, False, False, "one_expert", None, 24, 512, 4, 3),
    (False, False, True, "random", [0], 24, 512, 4, 3),
    (True, False, False, "random", None, 3, 7168, 4, 3),  # DeepSeek's hidden, R * M not a multiple of 8
    (True, True, True, "random", None, 16, 7168, 5, 1),  # UE8M0, top-1, experts per rank not a power of 2
    (False, False, False, "random", None, 9, 2056, 1, 1),  # one expert per rank, bf16 hidden % 128 != 0
]


@pytest.mark.gpu(1)
@pytest.mark.parametrize("use_fp8,ue8m0,hook,pattern,tokens,M,H,epr,topk", _SHAPES)
def test_low_latency_one_gpu_cases(rank_pool, use_fp8, ue8m0, hook, pattern, tokens, M, H, epr, topk):
    """The kernel path: receive hooks, every token to one expert, a rank with no tokens, DeepSeek's hidden
    size, small M, top-1, one expert per rank."""
    rank_pool(1, backend="nccl").run(
        rank_low_latency, "nvlink", use_fp8, ue8m0, hook, 9, pattern, tokens, M, H, epr, topk
    )


@pytest.mark.gpu
@pytest.mark.parametrize("use_fp8,ue8m0,hook,pattern,tokens,M,H,epr,topk", _SHAPES[1:])
def test_low_latency_gpu_cases(rank_pool, use_fp8, ue8m0, hook, pattern, tokens, M, H, epr, topk):
    rank_pool(2, backend="nccl").run(
        rank_low_latency, "nvlink", use_fp8, ue8m0, hook, 10, pattern, tokens, M, H, epr, topk
    )


def rank_low_latency_two_pending(rank, R):
    """Two micro-batches with receive hooks pending at once (DeepEP's overlap pattern): both dispatches
    send, then both hooks receive; the same for combine; a third call while two hooks wait raises."""
    dev = device()
    M, H, E = 16, 1024, 4 * R
    buf = get_buffer("nvlink")
    cases = [make_case(20 + mb, R, hidden=H, topk=3, num_experts=E, tokens=[M - mb] * R) for mb in range(2)]
    L = E // R
    for step in range(2):
        got = [
            buf.low_latency_dispatch(
                c.xs[rank].to(dev), c.topk_idx[rank].to(dev), M, E, use_fp8=False, return_recv_hook=True
            )
            for c in cases
        ]
        if step == 1:
            with pytest.raises(deep_ep.DeepEPInputError, match="receive hooks"):
                buf.low_latency_dispatch(
                    cases[0].xs[rank].to(dev),
                    cases[0].topk_idx[rank].to(dev),
                    M,
                    E,
                    use_fp8=False,
                    return_recv_hook=True,
                )
        for g in got:
            g[4]()
        outs = []
        for c, (recv_x, count, handle, _, _) in zip(cases, got):
            exp = ref.low_latency_dispatch([x.float() for x in c.xs], c.topk_idx, M, E)
            assert_same(count.cpu(), exp[rank][1], f"recv_count, step {step}")
            for l in range(L):
                n = int(exp[rank][1][l])
                assert_same(recv_x[l, :n].float().cpu(), exp[rank][0][l, :n], f"expert {l}, step {step}")
            y = (recv_x.float() * 2).to(torch.bfloat16)
            outs.append(
                buf.low_latency_combine(
                    y, c.topk_idx[rank].to(dev), c.topk_weights[rank].to(dev), handle, return_recv_hook=True
                )
            )
        for o in outs:
            o[2]()
        for c, o in zip(cases, outs):
            exp = ref.low_latency_dispatch([x.float() for x in c.xs], c.topk_idx, M, E)
            assert_ll_combine(
                o[0],
                [(e[0] * 2).to(torch.bfloat16) for e in exp],
                exp,
                c.topk_idx,
                c.topk_weights,
                rank,
                f"combine, step {step}",
            )


@pytest.mark.gpu(1)
def test_low_latency_two_pending_one_gpu(rank_pool):
    rank_pool(1, backend="nccl").run(rank_low_latency_two_pending)


@pytest.mark.gpu
def test_low_latency_two_pending(rank_pool):
    rank_pool(2, backend="nccl").run(rank_low_latency_two_pending)


def rank_low_latency_paths_agree(rank, R):
    """The nvlink kernel path and the pair-dispatch (torch) path give the same bytes and sums."""
    import os

    dev = device()
    M, H, E = 40, 1024, 8 * R
    case = make_case(11, R, hidden=H, topk=4, num_experts=E, tokens=[M] * R, neg_frac=0.1)
    buf = get_buffer("nvlink")
    x, idx, w = case.xs[rank].to(dev), case.topk_idx[rank].to(dev), case.topk_weights[rank].to(dev)
    got = {}
    for path in ("kernels", "torch"):
        if path == "torch":
            os.environ["DEEP_EP_DISABLE_TRITON"] = "1"
        try:
            for fp8 in (True, False):
                recv_x, count, handle, _, _ = buf.low_latency_dispatch(x, idx, M, E, use_fp8=fp8)
                vals = recv_x[0].view(torch.uint8) if fp8 else recv_x.view(torch.int16)
                y = (recv_x[0].float() * recv_x[1].repeat_interleave(128, dim=-1)).to(torch.bfloat16) if fp8 else recv_x
                out, _, _ = buf.low_latency_combine(y, idx, w, handle)
                mag, _, _ = buf.low_latency_combine(y.abs(), idx, w.abs(), handle)  # sum of |w| |y|
                rows = [vals[l, : int(c)].clone() for l, c in enumerate(count.tolist())]
                got[path, fp8] = (count.clone(), rows, out.float(), mag.float())
        finally:
            os.environ.pop("DEEP_EP_DISABLE_TRITON", None)
    for fp8 in (True, False):
        a, b = got["kernels", fp8], got["torch", fp8]
        assert_same(a[0], b[0], f"recv_count fp8={fp8}")
        for l, (ra, rb) in enumerate(zip(a[1], b[1])):
            assert torch.equal(ra, rb), f"expert {l} rows differ between the paths (fp8={fp8})"
        # the kernels round each rank's partial sum to bf16 once (unit 2**-8 of at most sum |w| |y|)
        lim = 1e-2 + 1e-2 * b[2].abs() + 2.0**-8 * b[3]
        assert not ((a[2] - b[2]).abs() > lim).any(), f"combine fp8={fp8}: the paths differ beyond the bound"


@pytest.mark.gpu(1)
def test_low_latency_paths_agree_one_gpu(rank_pool):
    rank_pool(1, backend="nccl").run(rank_low_latency_paths_agree)


@pytest.mark.gpu
def test_low_latency_paths_agree(rank_pool):
    rank_pool(2, backend="nccl").run(rank_low_latency_paths_agree)


def rank_low_latency_invalid_ids(rank, R):
    """On the kernel path an invalid id is skipped and flagged; the next call raises (no host sync)."""
    dev = device()
    buf = get_buffer("nvlink")
    x = torch.ones((2, 256), dtype=torch.bfloat16, device=dev)
    E = 4 * R
    for bad in ([[1, 1], [0, 2]], [[0, E], [1, -1]]):
        buf.low_latency_dispatch(x, torch.tensor(bad, device=dev), 4, E, use_fp8=False)
        torch.cuda.synchronize()
        with pytest.raises(deep_ep.DeepEPInputError, match="invalid topk_idx"):
            buf.low_latency_dispatch(x, torch.tensor([[0, 1], [2, 3]], device=dev), 4, E, use_fp8=False)
    _, count, _, _, _ = buf.low_latency_dispatch(x, torch.tensor([[0, 1], [2, 3]], device=dev), 4, E, use_fp8=False)
    assert count.tolist() == [1, 1, 1, 1]  # one rank: every expert is local


@pytest.mark.gpu(1)
def test_low_latency_invalid_ids_one_gpu(rank_pool):
    rank_pool(1, backend="nccl").run(rank_low_latency_invalid_ids)


@pytest.mark.gpu(1)
def test_low_latency_graph_one_gpu(rank_pool):
    rank_pool(1, backend="nccl").run(rank_low_latency_graph)


def rank_low_latency_remote_error(rank, R):
    """A bad low-latency dispatch on one rank makes every rank raise (not wait) on the collective path."""
    buf = get_buffer()
    M = 4
    T = 6 if rank == 0 else 3  # rank 0: more tokens than M
    x = torch.zeros((T, 256), dtype=torch.bfloat16)
    idx = torch.tensor([[0, 1]] * T, dtype=torch.int64)
    if rank == 0:
        with pytest.raises(deep_ep.DeepEPInputError, match="more than num_max_dispatch_tokens_per_rank"):
            buf.low_latency_dispatch(x, idx, M, 2 * R)
    else:
        with pytest.raises(deep_ep.RemoteInputError, match="rank 0"):
            buf.low_latency_dispatch(x, idx, M, 2 * R)
    buf.low_latency_dispatch(x[:3], idx[:3], M, 2 * R)  # the Buffer still works


def test_low_latency_remote_error(rank_pool):
    rank_pool(2).run(rank_low_latency_remote_error)


def test_low_latency_kernel_path_ordering_rules():
    """The kernel path's host-side ordering (deep_ep/transport/nvlink/low_latency.py), with a stand-in arena: calls
    alternate areas; a call passes a leading barrier while a hook is pending or once a capture happened;
    a third call with two hooks pending raises; a hook runs once."""
    from deep_ep.transport.nvlink.low_latency import NVLinkLowLatency

    class Arena:
        nbytes, seq, barriers = 1 << 20, 0, 0

        def peek_area(self):
            return (self.seq % 2) * (self.nbytes // 2)

        def next_area(self):
            self.seq += 1
            return ((self.seq - 1) % 2) * (self.nbytes // 2)

        def barrier(self):
            self.barriers += 1

    ll = NVLinkLowLatency.__new__(NVLinkLowLatency)
    ll.pending, ll.captured, ll.retired, ll.pending_areas = 0, False, [], set()
    a = Arena()
    assert [ll._start(a) for _ in range(3)] == [0, 1 << 19, 0] and a.barriers == 0
    ran = []
    h1 = ll._hook(lambda: ran.append(1), 0)  # (the last call took area 0)
    off = ll._start(a)  # one hook pending: a leading barrier
    assert a.barriers == 1 and off == 1 << 19
    h2 = ll._hook(lambda: ran.append(2), off)
    with pytest.raises(deep_ep.DeepEPInputError, match="receive hooks"):
        ll._start(a)
    h1()
    h1()
    h2()
    assert ran == [1, 2] and ll.pending == 0 and not ll.pending_areas
    ll._start(a)
    assert a.barriers == 1
    ll.captured = True  # after a capture every call leads with a barrier
    ll._start(a)
    assert a.barriers == 2


def test_low_latency_call_never_takes_the_area_of_a_pending_hook():
    """D0 (hook pending, area 0), D1 (area 1, its hook called), D2 would take area 0 while D0's rows are
    unread: it raises (before, it overwrote them)."""
    from deep_ep.transport.nvlink.low_latency import NVLinkLowLatency

    class Arena:
        nbytes, seq = 1 << 20, 0

        def peek_area(self):
            return (self.seq % 2) * (self.nbytes // 2)

        def next_area(self):
            self.seq += 1
            return ((self.seq - 1) % 2) * (self.nbytes // 2)

        def barrier(self):
            pass

    ll = NVLinkLowLatency.__new__(NVLinkLowLatency)
    ll.pending, ll.captured, ll.retired, ll.pending_areas = 0, False, [], set()
    a = Arena()
    h0 = ll._hook(lambda: None, ll._start(a))  # D0: area 0, hook pending
    h1 = ll._hook(lambda: None, ll._start(a))  # D1: area 1
    h1()  # D1 received; D0 still pending
    with pytest.raises(deep_ep.DeepEPInputError, match="staging area of an earlier call"):
        ll._start(a)
    assert a.seq == 2, "the refused call took no area"
    h0()
    assert ll._start(a) == 0


@pytest.mark.gpu(4)
@pytest.mark.parametrize("world", [3, 4])
@pytest.mark.parametrize("use_fp8,ue8m0,hook,pattern,tokens,M,H,epr,topk", [_SHAPES[0], _SHAPES[2], _SHAPES[4]])
def test_low_latency_gpu_more_ranks(rank_pool, world, use_fp8, ue8m0, hook, pattern, tokens, M, H, epr, topk):
    """The kernel path at 3 and 4 ranks (on one GPU: ``DEEP_EP_TEST_SHARE_GPU=4``)."""
    rank_pool(world, backend="nccl").run(
        rank_low_latency, "nvlink", use_fp8, ue8m0, hook, 12, pattern, tokens, M, H, epr, topk
    )


@pytest.mark.gpu(4)
def test_low_latency_two_pending_4_ranks(rank_pool):
    rank_pool(4, backend="nccl").run(rank_low_latency_two_pending)
