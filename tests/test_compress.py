"""Wire compression (deep_ep.compress, issue 4): codecs against float64 math, exact byte layouts, special
values, 'auto' byte targets; dispatch / combine with each level against the reference of the decoded rows
(CPU ranks), and the GPU paths (kernels byte-identical to the reference, nvlink transport)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deep_ep
from deep_ep import reference as ref
from deep_ep.compress import make_codec, relative_error
from tests._cases import assert_same, device, get_buffer, make_case

LEVELS = (8, 4, "auto")


def _gauss(T, H, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((T, H), generator=g).to(dtype)


@pytest.mark.parametrize("H", [7168, 2047])
def test_error_on_gaussian_rows(H):
    """Relative L2 error on 64 Gaussian rows (measured at H=7168: level 8 2.58%, level 4 9.69%, 'auto' at 0.3
    8.99%, as README's Compression table states to 0.1%); the issue's bounds are 4% and 12%. 'auto' at 0.3
    spends more bytes than level 4 (0.299 vs 0.281 of bf16) and has less error; at level 4's own bytes see
    test_auto_at_level4_bytes_is_level4."""
    x = _gauss(64, H, H)
    errs = {}
    for level in LEVELS:
        c = make_codec(level, H, ratio=0.3)
        errs[level] = relative_error(x.float(), c.roundtrip(x).float())
    assert float(errs[8].mean()) <= 0.04 and float(errs[8].max()) <= 0.04
    assert float(errs[4].mean()) <= 0.12 and float(errs[4].max()) <= 0.12
    assert make_codec("auto", H, ratio=0.3).row_bytes > make_codec(4, H).row_bytes
    assert float(errs["auto"].mean()) < float(errs[4].mean())  # more bytes than level 4, less error
    assert 0.02 < float(errs[8].mean()) and 0.08 < float(errs[4].mean())  # the figures are what they are
    if H == 7168:  # README's figures, to their 0.1%
        for level, readme in ((8, 0.026), (4, 0.097), ("auto", 0.090)):
            assert abs(float(errs[level].mean()) - readme) < 0.0005, (level, float(errs[level].mean()))


@pytest.mark.parametrize("H", [1, 31, 33, 128, 130, 2047, 7168])
def test_bytes_per_row_as_documented(H):
    x = _gauss(3, H, 7)
    nb128, nb32 = math.ceil(H / 128), math.ceil(H / 32)
    want = {8: 4 * nb128 + H, 4: 2 * nb32 + math.ceil(H / 2)}
    for level, nbytes in want.items():
        c = make_codec(level, H)
        assert c.row_bytes == nbytes and c.encode(x).shape == (3, nbytes)
    c = make_codec(8, H, use_ue8m0=True)
    assert c.row_bytes == nb128 + H and c.encode(x).shape == (3, nb128 + H)
    ratio = max(0.3, 18 * nb32 / (2 * H))
    if ratio > 1:  # a block header and scale cost more than bf16 itself
        with pytest.raises(deep_ep.DeepEPInputError, match="below what 'auto' can reach"):
            make_codec("auto", H, ratio=1.0)
        return
    c = make_codec("auto", H, ratio=ratio)
    assert c.row_bytes == 18 * nb32 + 16 * c.upgrades and c.encode(x).shape == (3, c.row_bytes)
    assert abs(c.row_bytes - ratio * 2 * H) <= max(0.01 * ratio * 2 * H, 8) + 1e-9


def _f64_bound(level, x, codec, packed):
    """Per-element error bound from float64 math on the block scales: half a quantisation step for the int
    codecs, fp8 e4m3's rounding (2^-4 relative, 2^-9 of the scale below the normal range) for level 8."""
    T, H = x.shape
    x64 = x.double()
    fin = torch.where(torch.isfinite(x64), x64.abs(), torch.zeros_like(x64))
    if level == 8:
        nb = codec.blocks
        amax = torch.nn.functional.pad(fin, (0, nb * 128 - H)).view(T, nb, 128).amax(2).clamp(min=1e-4)
        scale = (amax / 448).repeat_interleave(128, dim=1)[:, :H]
        if codec.round_scale:
            scale = torch.exp2(torch.ceil(torch.log2(scale)))
        return torch.maximum(x64.abs() * 2.0**-4, scale * 2.0**-9) * (1 + 1e-6)
    nb = codec.blocks
    amax = torch.nn.functional.pad(fin, (0, nb * 32 - H)).view(T, nb, 32).amax(2).clamp(min=1e-30)
    wide = torch.zeros((T, nb), dtype=torch.bool)
    if level == "auto":
        bits = packed[:, : 2 * nb].to(torch.int32).view(T, nb, 2)
        wide = ((bits[:, :, 1] >> 7) & 1) == 1
    qmax = torch.where(wide, 127.0, 7.0).double()
    step = (amax / qmax).repeat_interleave(32, dim=1)[:, :H]
    return step * 0.5 * (1 + 2.0**-7) + 1e-300  # the bf16 scale may be rounded either way


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("H", [96, 200, 1000])
def test_codecs_against_float64(level, H):
    """Every decoded value within the float64 bound; scales per block as documented; 'auto' upgrades the
    k blocks of largest amax."""
    g = torch.Generator().manual_seed(H)
    x = torch.randn((16, H), generator=g) * torch.exp(torch.randn((16, 1), generator=g) * 3)
    c = make_codec(level, H, ratio=0.45)
    packed = c.encode(x)
    y = c.decode(packed, torch.float64)
    err = (y.double() - x.double()).abs()
    assert bool((err <= _f64_bound(level, x, c, packed)).all()), float((err / _f64_bound(level, x, c, packed)).max())
    if level == "auto":
        nb, k = c.blocks, c.upgrades
        assert 0 < k < nb
        bits = packed[:, : 2 * nb].to(torch.int32).view(16, nb, 2)
        wide = ((bits[:, :, 1] >> 7) & 1) == 1
        amax = torch.nn.functional.pad(x.abs(), (0, nb * 32 - H)).view(16, nb, 32).amax(2)
        assert bool((wide.sum(1) == k).all())
        kth = amax.sort(dim=1, descending=True).values[:, k - 1 : k]
        assert bool((amax[wide] >= kth.expand(-1, nb)[wide]).all())


def test_fp8_scale_options():
    x = _gauss(8, 384, 3).float() * 5
    plain = make_codec(8, 384).encode(x)
    scales = plain[:, :12].contiguous().view(torch.float32)
    amax = x.abs().view(8, 3, 128).amax(2).clamp(min=1e-4)
    assert torch.equal(scales, amax / 448)  # DeepEP's scale
    r = make_codec(8, 384, round_scale=True)
    rs = r.encode(x)[:, :12].contiguous().view(torch.float32)
    assert bool((torch.log2(rs) == torch.log2(rs).round()).all()) and bool((rs >= amax / 448).all())
    u = make_codec(8, 384, use_ue8m0=True)
    up = u.encode(x)
    assert torch.equal(torch.exp2(up[:, :3].float() - 127), rs)  # UE8M0: the biased exponent
    assert torch.equal(u.decode(up, torch.float32), r.decode(r.encode(x), torch.float32))


@pytest.mark.parametrize("level", LEVELS)
def test_special_values(level):
    """Zero rows stay zero; NaN stays NaN where it was and leaves the rest of its block alone; Inf
    saturates; huge rows keep their relative error; tiny rows too except at level 8 (floor 1e-4)."""
    H = 160
    x = _gauss(6, H, 11).float()
    x[0] = 0
    x[1, 7] = float("nan")
    x[2, 9] = float("inf")
    x[2, 40] = float("-inf")
    x[3] *= 1e30
    x[4] *= 1e-20
    c = make_codec(level, H, ratio=0.5)
    y = c.roundtrip(x)
    assert bool((y[0] == 0).all())
    assert math.isnan(float(y[1, 7])) and int(torch.isnan(y).sum()) == 1
    assert math.isfinite(float(y[2, 9])) and float(y[2, 9]) > 0 and float(y[2, 40]) < 0
    e = relative_error(x, y)
    bound = 0.04 if level == 8 else 0.12
    assert float(e[1]) <= bound and float(e[3]) <= bound and float(e[5]) <= bound
    if level == 8:
        assert float(e[4]) == 1.0  # below the 1e-4 floor nothing is left (DeepEP's format)
    else:
        assert float(e[4]) <= bound


def test_auto_error_below_level4_with_more_bytes():
    """'auto' at ratios 0.30 / 0.35 / 0.45 (more bytes than level 4's 0.281) has less error than level 4; the
    comparison at level 4's exact bytes is test_auto_at_level4_bytes_is_level4."""
    H = 7168
    x = _gauss(32, H, 5)
    four = make_codec(4, H)
    e4 = relative_error(x.float(), four.roundtrip(x).float()).mean()
    for ratio in (0.3, 0.35, 0.45):
        c = make_codec("auto", H, ratio=ratio)
        assert abs(c.row_bytes / (2 * H) - ratio) <= 0.01 * ratio and c.row_bytes > four.row_bytes
        e = relative_error(x.float(), c.roundtrip(x).float()).mean()
        assert e < e4
    with pytest.raises(deep_ep.DeepEPInputError, match="below what 'auto' can reach"):
        make_codec("auto", H, ratio=0.2)


@pytest.mark.parametrize("H", [7168, 2047, 1024])
def test_auto_at_level4_bytes_is_level4(H):
    """At exactly level 4's bytes per row 'auto' has no byte to spend (its 18 bytes per block are level 4's
    bf16 scale and 16 bytes of int4; the level bit rides in the scale's sign), so it upgrades nothing, writes
    level 4's bytes and has level 4's error: no worse, and not better without a format change. One upgrade
    more (16 bytes) already lowers the error."""
    four = make_codec(4, H)
    same = make_codec("auto", H, ratio=four.row_bytes / (2 * H))
    assert same.upgrades == 0 and same.row_bytes == four.row_bytes
    x = _gauss(16, H, H + 1)
    assert torch.equal(same.encode(x), four.encode(x))
    e4 = relative_error(x.float(), four.roundtrip(x).float())
    ea = relative_error(x.float(), same.roundtrip(x).float())
    assert torch.equal(ea, e4) and float(ea.mean()) <= float(e4.mean())
    one = make_codec("auto", H, ratio=(four.row_bytes + 16) / (2 * H))
    assert one.upgrades == 1
    assert float(relative_error(x.float(), one.roundtrip(x).float()).mean()) < float(e4.mean())


def test_auto_cannot_reach_level4_bytes_when_32_does_not_divide_h():
    """H = 7000: level 4 packs the last block (24 values) in 12 bytes, 'auto' in 16, so level 4's ratio is
    below every 'auto' width and is refused."""
    four = make_codec(4, 7000)
    assert four.row_bytes == 2 * 219 + 3500 < 18 * 219
    with pytest.raises(deep_ep.DeepEPInputError, match="below what 'auto' can reach"):
        make_codec("auto", 7000, ratio=four.row_bytes / (2 * 7000))


@pytest.mark.parametrize("H", [1024, 2048, 4096, 7168, 7000])
def test_auto_byte_target_guarantee(H):
    """The documented guarantee (compress.py): for a target t = ratio * 2H between the all-int4 and all-int8
    widths, |row_bytes - t| <= max(1% of t, 8 bytes), and row_bytes <= t whenever some width lies within 1%
    below t; within 1% for every accepted ratio once 18 * ceil(H/32) >= 800 (H >= 1409); a target that is a
    width gives that width; above the all-int8 width every block is int8."""
    nb = math.ceil(H / 32)
    lo_w, hi_w = 18 * nb, 34 * nb
    widths = [lo_w + 16 * k for k in range(nb + 1)]
    ratios = [lo_w / (2 * H) + i * (hi_w - lo_w) / (2 * H) / 997 for i in range(998)] + [0.3, 0.35, 0.45]
    for ratio in ratios:
        t = ratio * 2 * H
        c = make_codec("auto", H, ratio=ratio)
        w = c.row_bytes
        assert w == lo_w + 16 * c.upgrades and 0 <= c.upgrades <= nb
        assert abs(w - t) <= max(0.01 * t, 8) + 1e-6, (ratio, w, t)
        if H >= 1409:
            assert abs(w - t) <= 0.01 * t + 1e-6, (ratio, w, t)
        if any(t - 0.01 * t - 1e-6 <= v <= t for v in widths):
            assert w <= t + 1e-6, (ratio, w, t)
    for k in range(nb + 1):  # a target that is a width: that width
        assert make_codec("auto", H, ratio=widths[k] / (2 * H)).upgrades == k
    assert make_codec("auto", H, ratio=1.0).upgrades == nb
    if H == 1024:  # the documented miss: 8 bytes, not 1%
        c = make_codec("auto", H, ratio=0.3)
        assert c.row_bytes == 608 and 0.01 < 1 - 608 / 614.4


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("H", [256, 130])
def test_empty_rows(level, H):
    c = make_codec(level, H, ratio=0.6)
    packed = c.encode(torch.zeros((0, H), dtype=torch.bfloat16))
    assert packed.shape == (0, c.row_bytes) and c.decode(packed).shape == (0, H)


def test_float16_never_overflows():
    """A scale rounded up to bf16 must not decode a finite float16 input to infinity."""
    x = torch.full((2, 64), 65504.0, dtype=torch.float16)
    x[1] *= -1
    for level in LEVELS:
        y = make_codec(level, 64, ratio=0.9).roundtrip(x)
        assert bool(torch.isfinite(y).all()), level


def test_bad_arguments():
    with pytest.raises(deep_ep.DeepEPInputError, match="one of 16, 8, 4, 'auto'"):
        make_codec(2, 64)
    c = make_codec(8, 64)
    with pytest.raises(deep_ep.DeepEPInputError, match="hidden=64"):
        c.encode(torch.zeros(2, 65))
    with pytest.raises(deep_ep.DeepEPTypeError):
        c.encode(torch.zeros(2, 64, dtype=torch.int32))
    with pytest.raises(deep_ep.DeepEPInputError, match="uint8"):
        c.decode(torch.zeros(2, 3, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------ through a Buffer
def rank_dispatch_levels(rank, R, backend, worst):
    import deep_ep as de

    dev = device()
    case = make_case(21, R, hidden=200, topk=3, num_experts=8, tokens=[30, 17, 25, 9][:R])
    E = case.num_experts
    for level in LEVELS:
        buf = get_buffer(
            backend,
            compression_level=level,
            compression_ratio=0.45,
            combine_compression_level=8,
            compression_stats=True,
        )
        codec = make_codec(level, case.hidden, ratio=0.45)
        xs_q = [codec.roundtrip(x) for x in case.xs]
        w = sum(case.tokens) if worst else 0
        exp = ref.dispatch(xs_q, case.topk_idx, E, case.topk_weights, num_worst_tokens=w)
        idx = case.topk_idx[rank].to(dev)
        _, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
        out = buf.dispatch(
            case.xs[rank].to(dev),
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=idx,
            topk_weights=case.topk_weights[rank].to(dev),
            num_worst_tokens=w,
        )
        n = exp[rank].num_recv_tokens
        assert_same(out[0][:n].cpu(), exp[rank].recv_x[:n], f"level {level} recv_x")
        st = buf.last_dispatch_stats
        assert st["level"] == level and st["row_bytes"] == codec.row_bytes and 0 < st["rel_err_max"] < 0.12
        h = out[4]
        enc = buf.dispatch(case.xs[rank].to(dev), handle=h, return_compressed=True)[0]
        assert isinstance(enc, de.wire.CompressedRows)
        assert_same(enc.decode(torch.bfloat16)[:n].cpu(), exp[rank].recv_x[:n], f"level {level} encoded")
        plain = buf.dispatch(case.xs[rank].to(dev), handle=h, compress=False)[0]  # this call in 16 bits
        assert_same(plain[:n].cpu(), ref.dispatch(case.xs, case.topk_idx, E)[rank].recv_x[:n], "compress=False")
        # combine in 8 bits: the reference combine of what every rank decodes
        ys = [e.recv_x * (r + 2) for r, e in enumerate(exp)]
        c8 = make_codec(8, case.hidden)
        want = ref.combine([c8.roundtrip(y) for y in ys], exp, case.tokens)
        got = buf.combine(out[0] * (rank + 2), h)[0]
        assert_same(got.cpu(), want[rank][0], f"level {level} combine (8-bit)")
        full = buf.combine(out[0] * (rank + 2), h, compress=False)[0]
        assert_same(full.cpu(), ref.combine(ys, exp, case.tokens)[rank][0], "combine compress=False")
    if R == 1:
        return
    # ranks that disagree on the level raise on every rank
    b = get_buffer(backend)
    idx = case.topk_idx[rank].to(dev)
    _, _, per_expert, in_rank, _ = b.get_dispatch_layout(idx, E)
    with pytest.raises(de.RankMismatchError, match="compression level"):
        b.dispatch(
            case.xs[rank].to(dev),
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=idx,
            compress=8 if rank == 0 else 4,
        )


def _documented_row_bytes(level, H, ratio):
    """Bytes per row as compress.py's table documents them (for 'auto', ``k`` from the codec)."""
    nb128, nb32 = math.ceil(H / 128), math.ceil(H / 32)
    if level == 16:
        return 2 * H
    if level == 8:
        return 4 * nb128 + H
    if level == 4:
        return 2 * nb32 + math.ceil(H / 2)
    return 18 * nb32 + 16 * make_codec("auto", H, ratio=ratio).upgrades


def rank_dispatch_stats(rank, R):
    """``compression_stats=True``: ``bytes_on_wire`` = rows sent to other ranks (once per destination rank) x the
    documented bytes per row, and ``rel_err_mean`` / ``rel_err_max`` = the relative L2 error, computed here in
    float64 from encode / decode, of the rows this rank sends (to any rank). Rows routed nowhere are made to
    have a larger error than any sent row (1e-12 x a spiky pattern: level 8 flushes them to zero, int4 zeroes
    their small values), so counting them would change the max."""
    H, E, ratio = 200, 8, 0.45
    case = make_case(41, R, hidden=H, topk=2, num_experts=E, tokens=[23, 19], neg_frac=0.45)
    x = case.xs[rank].clone()
    idx = case.topk_idx[rank]
    sent = (idx >= 0).any(dim=1)
    assert 0 < int(sent.sum()) < x.size(0), "the case needs tokens routed nowhere"
    spiky = torch.full((H,), 0.06)
    spiky[::32] = 1.0
    x[~sent] = (spiky * 1e-12).to(x.dtype)
    dest = torch.zeros((x.size(0), R), dtype=torch.bool)  # token -> destination ranks
    for t, e in (idx >= 0).nonzero().tolist():
        dest[t, int(idx[t, e]) // (E // R)] = True
    remote = int(dest.sum()) - int(dest[:, rank].sum())
    assert remote > 0
    buf = get_buffer("collective", compression_ratio=ratio, compression_stats=True)
    _, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    assert torch.equal(in_rank.cpu(), dest)
    for level in (16, 8, 4, "auto"):
        compress = False if level == 16 else level
        handle = buf.dispatch(
            x, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx, compress=compress
        )[4]
        stats = [buf.last_dispatch_stats]
        buf.dispatch(x, handle=handle, compress=compress)  # the cached dispatch reports alike
        stats.append(buf.last_dispatch_stats)
        row_bytes = _documented_row_bytes(level, H, ratio)
        if level == 16:
            want_mean = want_max = 0.0
        else:
            c = make_codec(level, H, ratio=ratio)
            assert c.row_bytes == row_bytes
            x64 = x.double()
            y64 = c.decode(c.encode(x), x.dtype).double()  # what every receiver gets
            err = (y64 - x64).norm(dim=1) / x64.norm(dim=1)
            want_mean, want_max = float(err[sent].mean()), float(err[sent].max())
            assert float(err[~sent].min()) > want_max, "rows routed nowhere must be the worst ones"
            assert 0 < want_max < 0.2
        for rec in stats:
            assert rec["level"] == level and rec["row_bytes"] == row_bytes and rec["bf16_row_bytes"] == 2 * H
            assert rec["bytes_on_wire"] == remote * row_bytes
            assert rec["rel_err_mean"] == pytest.approx(want_mean, rel=1e-9, abs=1e-12)
            assert rec["rel_err_max"] == pytest.approx(want_max, rel=1e-9, abs=1e-12)
    assert get_buffer("collective").last_dispatch_stats is None  # off unless asked
    return remote


def test_dispatch_stats_cpu(rank_pool):
    remote = rank_pool(2).run(rank_dispatch_stats)
    assert all(r > 0 for r in remote)


def test_dispatch_combine_with_each_level_cpu(rank_pool):
    rank_pool(2).run(rank_dispatch_levels, "collective", False)


def test_dispatch_combine_with_each_level_hierarchical_cpu(rank_pool):
    rank_pool(2).run(rank_dispatch_levels, "hierarchical", False)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,worst", [("nvlink", False), ("nvlink", True), ("collective", False)])
def test_dispatch_combine_with_each_level_gpu(rank_pool, backend, worst):
    rank_pool(2, backend="nccl").run(rank_dispatch_levels, backend, worst)


@pytest.mark.gpu(1)
@pytest.mark.parametrize("worst", [False, True])
def test_dispatch_combine_with_each_level_one_gpu(rank_pool, worst):
    rank_pool(1, backend="nccl").run(rank_dispatch_levels, "nvlink", worst)


@pytest.mark.gpu(1)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "level,opts",
    [
        (8, {}),
        (8, {"round_scale": True}),
        (8, {"use_ue8m0": True}),
        (4, {}),
        ("auto", {"ratio": 0.3}),
        ("auto", {"ratio": 0.6}),
    ],
)
@pytest.mark.parametrize("H", [7168, 2047, 33])
def test_kernels_same_bytes_as_reference(level, opts, H):
    """The Triton codecs write the same bytes and decode to the same values as the torch reference."""
    if level == "auto" and H == 33:
        opts = {"ratio": 0.9}
    c = make_codec(level, H, **opts)
    x = _gauss(257, H, H).cuda() * 3
    x[0] = 0
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    x[3] *= 1e30
    x[4] *= 1e-20
    got = c.encode(x)
    want = c.encode_reference(x)
    assert torch.equal(got, want), int((got != want).sum())
    assert torch.equal(got.cpu(), c.encode_reference(x.cpu())), "CPU reference bytes"
    assert torch.equal(
        c.decode_reference(want).cpu().nan_to_num(123.0), c.decode_reference(want.cpu()).nan_to_num(123.0)
    ), "CPU reference values"
    dec = c.decode(got, torch.float32)
    ref_dec = c.decode_reference(want)
    assert torch.equal(torch.nan_to_num(dec, nan=123.0), torch.nan_to_num(ref_dec, nan=123.0))
    bf = c.decode(got, torch.bfloat16).float().nan_to_num(123.0)
    assert torch.equal(bf, ref_dec.to(torch.bfloat16).float().nan_to_num(123.0))


def rank_grad_compression(rank, R):
    """Gradients travel in 16 bits whatever the Buffer's level; grad_compression=8 sends them in 8."""
    from deep_ep import ops

    case = make_case(31, R, hidden=256, topk=2, num_experts=4, tokens=[11, 6])
    E = case.num_experts
    buf = get_buffer("collective", compression_level=4)
    exp4 = ref.dispatch([make_codec(4, 256).roundtrip(x) for x in case.xs], case.topk_idx, E)
    c8 = make_codec(8, 256)
    for grad_level in (False, 8):
        x = case.xs[rank].float().requires_grad_()
        recv, _, _, _, h = ops.dispatch(buf, x, case.topk_idx[rank], num_experts=E, grad_compression=grad_level)
        assert_same(recv.detach().to(torch.bfloat16), exp4[rank].recv_x, "forward in level 4")
        y = recv.detach().clone().requires_grad_()
        out, _ = ops.combine(buf, y, h, grad_compression=grad_level)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(rank))
        out.backward(g)
        gs = [torch.randn((t, 256), generator=torch.Generator().manual_seed(r)) for r, t in enumerate(case.tokens)]
        sent = gs if grad_level is False else [c8.roundtrip(t) for t in gs]
        assert_same(y.grad, ref.dispatch(sent, case.topk_idx, E)[rank].recv_x, f"combine grad ({grad_level})")


def test_gradients_not_quantised_unless_asked(rank_pool):
    rank_pool(2).run(rank_grad_compression)


@st.composite
def _codec_cases(draw):
    level = draw(st.sampled_from(LEVELS))
    H = draw(st.integers(1, 300))
    T = draw(st.integers(0, 12))
    opts = {}
    if level == 8:
        opts = draw(st.sampled_from([{}, {"round_scale": True}, {"use_ue8m0": True}]))
    if level == "auto":
        floor = 18 * math.ceil(H / 32) / (2 * H)
        if floor > 1:
            level = 4
        else:
            opts = {"ratio": draw(st.floats(floor, 1.0))}
    scale = draw(st.sampled_from([1e-3, 1.0, 37.0, 1e4]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    return level, H, T, opts, scale, dtype, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None)
@given(case=_codec_cases())
def test_fuzz_codecs(case):
    """Random levels, options, widths, row counts, magnitudes and dtypes: bytes per row as documented and
    every decoded value within the float64 bound of its block."""
    level, H, T, opts, scale, dtype, seed = case
    c = make_codec(level, H, **opts)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((T, H), generator=g) * scale).to(dtype)
    packed = c.encode(x)
    assert packed.shape == (T, c.row_bytes) and packed.dtype == torch.uint8
    y = c.decode(packed, torch.float64)
    if T:
        err = (y - x.double()).abs()
        assert bool((err <= _f64_bound(level, x.float(), c, packed)).all())


def _gather_into(dev):
    for level in (8, 4, "auto", 16):
        c = make_codec(level, 300 if level != 8 else 384)
        x = _gauss(40, c.hidden, 7).to(dev).to(torch.bfloat16)
        idx = torch.tensor([5, 0, 39, 5, 17], device=dev)
        area = torch.full((9, c.row_bytes), 0xAB, dtype=torch.uint8, device=dev)
        got = c.encode(x, index=idx, out=area[2:7])
        assert got.data_ptr() == area[2].data_ptr()
        assert torch.equal(area[2:7], c.encode(x.index_select(0, idx))), f"level {level}: gathered bytes"
        assert bool((area[:2] == 0xAB).all()) and bool((area[7:] == 0xAB).all()), "wrote outside out="
        dst = torch.zeros((8, c.hidden), dtype=torch.bfloat16, device=dev)
        c.decode(area[2:7], torch.bfloat16, out=dst[1:6])
        assert torch.equal(dst[1:6], c.decode(area[2:7], torch.bfloat16)), f"level {level}: decode into out="
        assert bool((dst[0] == 0).all()) and bool((dst[6:] == 0).all())


def test_encode_gathered_into_out_cpu():
    """``encode(x, index=, out=)`` writes the bytes of ``x[index]`` into a view (a staging region);
    ``decode(out=)`` fills a slice: what the nvlink transport's fused packing uses."""
    _gather_into("cpu")


@pytest.mark.gpu(1)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_encode_gathered_into_out_gpu():
    _gather_into("cuda")


# ------------------------------------------------------------------------------------------ tolerance mode
def _blocky(T, H, seed, spread, dtype=torch.bfloat16):
    """Gaussian rows whose blocks of 32 values have scales ``exp(spread * N(0, 1))`` (``spread=0``: plain
    Gaussian rows): the larger the spread, the fewer upgrades bring a row under a tolerance."""
    g = torch.Generator().manual_seed(seed)
    nb = math.ceil(H / 32)
    scale = torch.exp(torch.randn((T, nb), generator=g) * spread).repeat_interleave(32, dim=1)[:, :H]
    return (torch.randn((T, H), generator=g) * scale).to(dtype)


def _roundtrip_errors(x):
    """``[T, nb + 1]``: relative_error of the round trip of every 'auto' codec k = 0..nb."""
    H = x.size(1)
    return torch.stack(
        [relative_error(x, make_codec("auto", H, upgrades=k).roundtrip(x)) for k in range(math.ceil(H / 32) + 1)], 1
    )


def _brute_force_upgrades(errs, tol):
    """k_row from the errors of every k: the smallest k with err(k') <= tol for all k' >= k (nb when all-int8
    misses tol)."""
    nb = errs.size(1) - 1
    want = []
    for row in (errs <= tol).tolist():
        k = nb
        while k > 0 and row[k - 1] and row[k]:
            k -= 1
        want.append(k)
    return torch.tensor(want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("H", [256, 200])
def test_tolerance_upgrades_against_brute_force(H, dtype):
    """compress.tolerance_upgrades equals the brute force over every k (exact ints), on rows of mixed block
    scales plus a zero row, NaN, Inf and tiny rows; a tiny tolerance upgrades every block."""
    from deep_ep.compress import tolerance_upgrades

    x = torch.cat([_blocky(20, H, H, 0.0), _blocky(20, H, H + 1, 2.0)]).to(dtype)
    x[0] = 0
    x[1, 5] = float("nan")
    x[2, 9] = float("inf")
    x[3] *= 1e-3
    nb = math.ceil(H / 32)
    errs = _roundtrip_errors(x)
    for tol in (0.09, 0.05, 0.02, 0.005, 1e-6):
        got = tolerance_upgrades(x, tol)
        want = _brute_force_upgrades(errs, tol)
        assert torch.equal(got.cpu(), want), (tol, got.tolist(), want.tolist())
        met = errs.gather(1, got.unsqueeze(1)).squeeze(1) <= tol
        assert bool((met | (got == nb)).all())
    assert bool((tolerance_upgrades(x[4:], 1e-6) == nb).all())
    assert int(tolerance_upgrades(x[:1], 1e-6)[0]) == 0  # a zero row is exact at any k
    assert tolerance_upgrades(x[:0], 0.05).shape == (0,)
    with pytest.raises(deep_ep.DeepEPInputError, match=r"\(0, 1\)"):
        tolerance_upgrades(x, 1.0)


def test_tolerance_upgrades_when_an_upgrade_adds_error():
    """A block of values on the int4 grid (amax 7: int4 is exact, int8's bf16 scale is not) upgraded first makes
    err(1) > err(0): a tolerance between them is met at k = 0 but not at k = 1, so the row asks for k = 2 (any
    k >= k_row must meet it, as the call sends every row with the largest k_row)."""
    from deep_ep.compress import tolerance_upgrades

    g = torch.Generator().manual_seed(0)
    b0 = torch.randint(-7, 8, (32,), generator=g).float()
    b0[0] = 7
    x = torch.cat([b0, torch.randn(32, generator=g) * 2]).unsqueeze(0).to(torch.bfloat16)
    errs = _roundtrip_errors(x)[0].tolist()
    assert errs[0] < errs[1] and errs[2] < errs[0]
    tol = (errs[0] + errs[1]) / 2
    assert int(tolerance_upgrades(x, tol)[0]) == 2 == int(_brute_force_upgrades(_roundtrip_errors(x), tol)[0])


def test_upgrades_codec_same_bytes_as_ratio_codec():
    """make_codec('auto', H, upgrades=k) is the 'auto' format with that k: the bytes of the ratio codec whose
    target is that width; bad upgrade arguments raise."""
    H = 1000
    nb = math.ceil(H / 32)
    x = _blocky(9, H, 3, 1.0)
    for k in (0, 1, 7, nb):
        c = make_codec("auto", H, upgrades=k)
        r = make_codec("auto", H, ratio=(18 * nb + 16 * k) / (2 * H))
        assert c.upgrades == r.upgrades == k and c.row_bytes == r.row_bytes == 18 * nb + 16 * k
        assert torch.equal(c.encode(x), r.encode(x))
    for bad in (
        dict(level=4, upgrades=1),
        dict(level="auto", upgrades=nb + 1),
        dict(level="auto", upgrades=-1),
        dict(level="auto", upgrades=True),
        dict(level="auto", upgrades=2, ratio=0.3),
    ):
        with pytest.raises(deep_ep.DeepEPInputError):
            make_codec(bad.pop("level"), H, **bad)


def test_wire_tolerance_settings(monkeypatch):
    """compression_tolerance: in (0, 1), with level 'auto' only, exclusive with compression_ratio; env
    DEEP_EP_COMPRESSION_TOLERANCE when neither is given; applies to compress=True / 'auto' calls only."""
    from deep_ep.wire import Wire

    monkeypatch.delenv("DEEP_EP_COMPRESSION_TOLERANCE", raising=False)
    monkeypatch.delenv("DEEP_EP_COMPRESSION_LEVEL", raising=False)
    w = Wire("auto", None, 16, None, tolerance=0.05)
    assert w.tolerance == 0.05 and w.call_tolerance(True) == 0.05 and w.call_tolerance("auto") == 0.05
    assert w.call_tolerance(False) is None and w.call_tolerance(8) is None and w.call_tolerance(0.3) is None
    assert Wire("auto", 0.3, 16, None).tolerance is None
    with pytest.raises(deep_ep.DeepEPInputError, match="exclusive"):
        Wire("auto", 0.3, 16, None, tolerance=0.05)
    for bad in (0, 1, 1.0, -0.1, 1.5, float("nan"), True, "0.1"):
        with pytest.raises(deep_ep.DeepEPInputError, match=r"\(0, 1\)"):
            Wire("auto", None, 16, None, tolerance=bad)
    with pytest.raises(deep_ep.DeepEPInputError, match="compression_level='auto'"):
        Wire(8, None, 16, None, tolerance=0.05)
    from deep_ep.settings import Settings

    def env_wire(**kw):  # a Buffer's Wire: its arguments resolved against the environment
        return Wire.from_settings(Settings.resolve(**kw))

    monkeypatch.setenv("DEEP_EP_COMPRESSION_TOLERANCE", "0.04")
    assert env_wire(compression_level="auto").tolerance == 0.04
    assert env_wire(compression_level="auto", compression_ratio=0.3).tolerance is None  # an explicit ratio wins
    assert env_wire(compression_level=8).tolerance is None  # the env only concerns 'auto'
    monkeypatch.setenv("DEEP_EP_COMPRESSION_TOLERANCE", "lots")
    with pytest.raises(deep_ep.DeepEPInputError, match="DEEP_EP_COMPRESSION_TOLERANCE"):
        env_wire(compression_level="auto")


_TOL_H, _TOL_E = 256, 8


def _tol_case(seed):
    """Two ranks whose rows want different k: rank 0 plain Gaussian rows, rank 1 rows of spread block scales."""
    case = make_case(seed, 2, hidden=_TOL_H, topk=2, num_experts=_TOL_E, tokens=[24, 20])
    case.xs = [_blocky(t, _TOL_H, seed + r, (0.0, 2.0)[r]) for r, t in enumerate(case.tokens)]
    return case


def _want_k(xs, idx, tol):
    """Every rank's own k (largest k_row of the rows it sends) and the agreed one."""
    from deep_ep.compress import tolerance_upgrades

    own = [int(tolerance_upgrades(x, tol)[(i >= 0).any(dim=1)].max()) for x, i in zip(xs, idx)]
    return own, max(own)


def rank_dispatch_tolerance(rank, R):
    """compression_tolerance on two ranks whose rows want different k: the call uses the largest, every
    received row meets the tolerance, recv_x is the reference dispatch of the decoded rows, a smaller
    tolerance spends more bytes, a tiny one upgrades every block; a cached dispatch agrees on its own k."""
    import time

    import torch.distributed as dist

    dev = device()
    case = _tol_case(51)
    H, E, nb = _TOL_H, _TOL_E, math.ceil(_TOL_H / 32)
    idx = case.topk_idx[rank].to(dev)
    plain = ref.dispatch(case.xs, case.topk_idx, E, case.topk_weights)
    xs2 = [_blocky(t, H, 70 + r, (2.0, 0.0)[r]) * 3 for r, t in enumerate(case.tokens)]  # the cached call's
    row_bytes, differ = [], False
    for tol in (0.09, 0.05, 0.035, 1e-6):  # k = 2, 6, 7, 8 (rank 0's)
        buf = get_buffer("collective", compression_level="auto", compression_tolerance=tol, compression_stats=True)
        own, k = _want_k(case.xs, case.topk_idx, tol)
        differ |= own[0] != own[1]
        codec = make_codec("auto", H, upgrades=k)
        exp = ref.dispatch([codec.roundtrip(x) for x in case.xs], case.topk_idx, E, case.topk_weights)
        _, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
        out = buf.dispatch(
            case.xs[rank].to(dev),
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=idx,
            topk_weights=case.topk_weights[rank].to(dev),
        )
        assert_same(out[0].cpu(), exp[rank].recv_x, f"tol {tol} recv_x")
        assert_same(out[1].cpu(), exp[rank].recv_topk_idx, f"tol {tol} recv_topk_idx")
        st = buf.last_dispatch_stats
        assert st["level"] == "auto" and st["row_bytes"] == 18 * nb + 16 * k
        row_bytes.append(st["row_bytes"])
        err = relative_error(plain[rank].recv_x, out[0].cpu())
        if tol > 1e-3:
            assert float(err.max()) <= tol, (tol, float(err.max()))
        else:
            assert k == nb and st["row_bytes"] == 34 * nb  # nothing meets 1e-6: all int8
        # cached dispatch: k from the rows it sends, agreed again
        own2, k2 = _want_k(xs2, case.topk_idx, tol)
        enc = buf.dispatch(xs2[rank].to(dev), handle=out[4], return_compressed=True)[0]
        assert enc.codec.upgrades == k2
        c2 = make_codec("auto", H, upgrades=k2)
        exp2 = ref.dispatch([c2.roundtrip(x) for x in xs2], case.topk_idx, E)
        assert_same(enc.decode(torch.bfloat16).cpu(), exp2[rank].recv_x, f"tol {tol} cached")
        if tol > 1e-3:
            err2 = relative_error(ref.dispatch(xs2, case.topk_idx, E)[rank].recv_x, enc.decode(torch.bfloat16).cpu())
            assert float(err2.max()) <= tol
    assert differ, "the ranks should want different k"
    assert all(a < b for a, b in zip(row_bytes, row_bytes[1:])), row_bytes  # smaller tolerance, more bytes
    # ranks that disagree raise on every rank, without a hang: one rank in tolerance mode and one at level 8
    # (per call, and per Buffer), or two tolerances
    buf = get_buffer("collective", compression_level="auto", compression_tolerance=0.05)
    _, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    lay = dict(is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx)
    x = case.xs[rank].to(dev)
    start = time.monotonic()
    with pytest.raises(deep_ep.RankMismatchError, match="compression level"):
        buf.dispatch(x, compress=True if rank == 0 else 8, **lay)
    for kw in (
        dict(compression_tolerance=0.05) if rank == 0 else dict(compression_ratio=0.4),
        dict(compression_tolerance=0.05 if rank == 0 else 0.02),
    ):
        other = deep_ep.Buffer(dist.group.WORLD, compression_level="auto", **kw)  # fresh on both ranks
        with pytest.raises(deep_ep.RankMismatchError, match="compression level"):
            other.dispatch(x, **lay)
        other.destroy()
    assert time.monotonic() - start < 10
    out = buf.dispatch(x, **lay)  # still in step
    k = _want_k(case.xs, case.topk_idx, 0.05)[1]
    c = make_codec("auto", H, upgrades=k)
    assert_same(
        out[0].cpu(),
        ref.dispatch([c.roundtrip(v) for v in case.xs], case.topk_idx, E)[rank].recv_x,
        "after the mismatches",
    )


def test_dispatch_tolerance_cpu(rank_pool):
    rank_pool(2).run(rank_dispatch_tolerance, timeout=120)


def rank_tolerance_bad_input(rank, R):
    """Tolerance mode: a rank with bad input raises its error and the other RemoteInputError (fresh and
    cached dispatch), no hang; bad settings raise at construction; a num_worst_tokens call on a device-path
    transport raises DeepEPInputError naming compression_ratio on every rank."""
    import time

    import torch.distributed as dist

    from tests.test_errors import _expect

    dev = device()
    case = _tol_case(61)
    E = _TOL_E
    buf = get_buffer("collective", compression_level="auto", compression_tolerance=0.05)
    idx = case.topk_idx[rank].to(dev)
    x = case.xs[rank].to(dev)
    _, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    lay = dict(is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx)
    w = case.topk_weights[rank].to(dev)
    bad = rank == 1
    start = time.monotonic()
    fn = lambda: buf.dispatch(x, topk_weights=w[:, :1] if bad else w, **lay)  # noqa: E731
    if bad:
        _expect(deep_ep.DeepEPInputError, fn, "topk_weights")
    else:
        _expect(deep_ep.RemoteInputError, fn, "rank 1")
    handle = buf.dispatch(x, **lay)[4]
    fn = lambda: buf.dispatch(x[:3] if bad else x, handle=handle)  # noqa: E731
    if bad:
        _expect(deep_ep.DeepEPInputError, fn, "tokens")
    else:
        _expect(deep_ep.RemoteInputError, fn, "rank 1")
    assert time.monotonic() - start < 10
    buf.dispatch(x, handle=handle)  # still in step
    for kw, words in (
        (dict(compression_tolerance=0.05, compression_ratio=0.3), "exclusive"),
        (dict(compression_tolerance=1.0), "(0, 1)"),
        (dict(compression_tolerance=0.0), "(0, 1)"),
        (dict(compression_level=8, compression_tolerance=0.05), "'auto'"),
    ):
        kw.setdefault("compression_level", "auto")
        _expect(deep_ep.DeepEPInputError, lambda: deep_ep.Buffer(dist.group.WORLD, **kw), words)
    # the num_worst_tokens device path (nvlink) never waits for the host: emulated on this CPU Buffer
    dbuf = deep_ep.Buffer(dist.group.WORLD, compression_level="auto", compression_tolerance=0.05)
    dbuf._transport.device_layout = True
    dbuf._check_every_call = False
    try:
        _expect(deep_ep.DeepEPInputError, lambda: dbuf.dispatch(x, num_worst_tokens=64, **lay), "compression_ratio")
        fn = lambda: dbuf.dispatch(x, num_worst_tokens=64 if bad else 0, **lay)  # noqa: E731
        if bad:
            _expect(deep_ep.DeepEPInputError, fn, "compression_ratio")
        else:
            _expect(deep_ep.RemoteInputError, fn, "rank 1")
    finally:
        dbuf.destroy()
    assert time.monotonic() - start < 20


def test_tolerance_bad_input_cpu(rank_pool):
    rank_pool(2).run(rank_tolerance_bad_input, timeout=60)
