"""ExpertParallelMoE against a single-process dense reference (all experts local): outputs and gradients, for
1, 2 and 4 chunks, group-limited routing, shared experts, stats; CPU ranks and 2 GPUs."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import deep_ep
from deep_ep.moe import ExpertParallelMoE, dense_moe_reference, route_tokens
from tests._cases import assert_same, device, get_buffer


def _full_weights(E, H, F, shared, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    router = torch.randn((E, H), generator=g) / H**0.5
    gu = torch.randn((E, 2 * F, H), generator=g) / H**0.5
    down = torch.randn((E, H, F), generator=g) / F**0.5
    sh = (
        (
            torch.randn((2 * F * shared, H), generator=g) / H**0.5,
            torch.randn((H, F * shared), generator=g) / (F * shared) ** 0.5,
        )
        if shared
        else None
    )
    to = lambda t: t.to(dtype)  # noqa: E731
    return to(router), to(gu), to(down), tuple(to(t) for t in sh) if sh else None


def _load(layer, rank, router, gu, down, sh):
    """This rank's share of the full weights (experts ``rank*L .. (rank+1)*L-1``) into ``layer``."""
    L = layer.num_local
    with torch.no_grad():
        layer.router.weight.copy_(router)
        layer.w_gate_up.copy_(gu[rank * L : (rank + 1) * L])
        layer.w_down.copy_(down[rank * L : (rank + 1) * L])
        if sh:
            layer.shared_gate_up.copy_(sh[0])
            layer.shared_down.copy_(sh[1])


def rank_moe(rank, R, backend, num_chunks, shared, n_group, dtype_name, tol):
    dtype = getattr(torch, dtype_name)
    dev = device()
    E, H, F, K = 4 * R, 64, 48, 3
    router, gu, down, sh = _full_weights(E, H, F, shared, 11, torch.float32)
    L = E // R
    layer = ExpertParallelMoE(
        H,
        F,
        E,
        K,
        num_shared_experts=shared,
        num_chunks=num_chunks,
        n_group=n_group,
        topk_group=2 if n_group > 1 else 1,
        norm_topk_prob=n_group > 1,
        buffer=get_buffer(backend),
        record_stats=True,
        dtype=dtype,
        device=dev,
    )
    _load(layer, rank, router, gu, down, sh)
    g = torch.Generator().manual_seed(100 + rank)
    T = [13, 9, 0, 17][rank]
    x = torch.randn((T, H), generator=g).to(dtype).to(dev).requires_grad_()
    y = layer(x)
    go = torch.randn((T, H), generator=g).to(dtype).to(dev)
    (y.float() * go.float()).sum().backward()
    # the dense reference, every expert local, with this rank's tokens
    xr = x.detach().clone().requires_grad_()
    refs = [t.to(dev).to(dtype).detach().clone().requires_grad_() for t in (router, gu, down)]
    shr = [t.to(dev).to(dtype).detach().clone().requires_grad_() for t in sh] if sh else None
    idx, w = route_tokens(xr, refs[0], K, n_group, 2 if n_group > 1 else 1, "softmax", n_group > 1)
    want = dense_moe_reference(xr, idx, w, refs[1], refs[2], tuple(shr) if shr else None)
    (want.float() * go.float()).sum().backward()
    assert_same(y, want, f"output ({num_chunks} chunks)", atol=tol, rtol=tol)
    if T:  # (a rank without tokens has no input gradients)
        assert_same(x.grad, xr.grad, "grad x", atol=tol, rtol=tol)
        assert_same(layer.router.weight.grad, refs[0].grad, "grad router (this rank's tokens)", atol=tol, rtol=tol)
    # expert weights: the sum over all ranks' tokens of the dense gradients of this rank's experts
    gsum = [r.grad.clone() if r.grad is not None else torch.zeros_like(r) for r in refs[1:]]
    for t in gsum:
        dist.all_reduce(t)
    assert_same(layer.w_gate_up.grad, gsum[0][rank * L : (rank + 1) * L], "grad w_gate_up", atol=tol, rtol=tol)
    assert_same(layer.w_down.grad, gsum[1][rank * L : (rank + 1) * L], "grad w_down", atol=tol, rtol=tol)
    if shr and T:
        assert_same(layer.shared_gate_up.grad, shr[0].grad, "grad shared (this rank's tokens)", atol=tol, rtol=tol)
    check_stats(layer, dev)
    return y.detach().cpu()


def check_stats(layer, dev) -> None:
    """The forward and backward time splits are consistent: positive parts, compute + exposed = step, comm =
    exposed + overlapped where the comm stream was busy longer than exposed, and the parts fit in the step as
    measured around another forward + backward (on CPU the spans are disjoint wall-clock intervals: compute +
    comm <= step)."""
    import time

    x = torch.randn((6, layer.hidden), dtype=layer.w_down.dtype, device=dev, requires_grad=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    y = layer(x)
    y.float().sum().backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall_us = (time.perf_counter() - t0) * 1e6
    fwd, bwd = layer.stats, layer.backward_stats
    assert fwd is not None and bwd is not None
    for st in (fwd, bwd, fwd + bwd):
        assert st.step_us > 0 and st.compute_us > 0 and st.comm_us > 0, st
        assert st.compute_us <= st.step_us * (1 + 1e-9), st
        assert abs(st.compute_us + st.exposed_comm_us - st.step_us) <= 1e-6 * st.step_us, st
        assert st.overlapped_comm_us == max(st.comm_us - st.exposed_comm_us, 0.0)
        if dev.type == "cpu":
            assert st.compute_us + st.comm_us <= st.step_us * (1 + 1e-9), st  # disjoint spans
            assert st.overlapped_comm_us == 0.0
    total = fwd + bwd
    assert total.step_us == fwd.step_us + bwd.step_us and total.comm_us == fwd.comm_us + bwd.comm_us
    assert total.step_us <= wall_us, (total.step_us, wall_us)


@pytest.mark.parametrize("num_chunks,shared,n_group", [(1, 0, 1), (2, 1, 1), (4, 0, 2)])
def test_moe_matches_dense_reference_cpu(rank_pool, num_chunks, shared, n_group):
    rank_pool(2).run(rank_moe, "collective", num_chunks, shared, n_group, "float64", 1e-9)


def rank_moe_chunks_equal(rank, R):
    """Chunking changes the numbers only by the rounding of matrix products over other row batches: the
    same rows meet the same experts and sums run in a fixed order."""
    outs = [rank_moe(rank, R, "collective", c, 1, 1, "float64", 1e-9) for c in (1, 2, 4)]
    for o in outs[1:]:
        assert_same(o, outs[0], "chunked output", atol=1e-13, rtol=1e-12)


def test_moe_chunks_change_nothing_cpu(rank_pool):
    rank_pool(2).run(rank_moe_chunks_equal)


def test_moe_four_ranks_cpu(rank_pool):
    rank_pool(4).run(rank_moe, "collective", 2, 1, 1, "float64", 1e-9)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,num_chunks", [("nvlink", 1), ("nvlink", 4), ("collective", 2)])
def test_moe_matches_dense_reference_gpu(rank_pool, backend, num_chunks):
    rank_pool(2, backend="nccl").run(rank_moe, backend, num_chunks, 1, 1, "float32", 1e-4)


@pytest.mark.gpu(1)
@pytest.mark.parametrize("num_chunks", [1, 3])
def test_moe_one_gpu(rank_pool, num_chunks):
    rank_pool(1, backend="nccl").run(rank_moe, "nvlink", num_chunks, 1, 2, "float32", 1e-4)


def rank_moe_errors(rank, R):
    with pytest.raises(deep_ep.DeepEPInputError, match="multiple of the group size"):
        ExpertParallelMoE(16, 8, 2 * R + 1, 2, buffer=get_buffer())
    with pytest.raises(deep_ep.DeepEPInputError, match="top_k"):
        ExpertParallelMoE(16, 8, 2 * R, 2 * R + 1, buffer=get_buffer())
    layer = ExpertParallelMoE(16, 8, 2 * R, 2, buffer=get_buffer())
    with pytest.raises(deep_ep.DeepEPInputError, match=r"\[tokens, 16\]"):
        layer(torch.zeros(3, 15))
    # expert weights changed in place between a chunked forward and its backward: autograd's version check
    chunked = ExpertParallelMoE(16, 8, 2 * R, 2, num_chunks=2, buffer=get_buffer())
    y = chunked(torch.randn(6, 16))
    with torch.no_grad():
        chunked.w_down.mul_(2)
    with pytest.raises(RuntimeError, match="inplace"):
        y.sum().backward()
    # no tokens on any rank, group-limited routing: an empty result, no error
    empty = ExpertParallelMoE(16, 8, 4 * R, 2, n_group=2, topk_group=1, num_chunks=3, buffer=get_buffer())
    assert empty(torch.zeros(0, 16)).shape == (0, 16)


def test_moe_errors(rank_pool):
    rank_pool(2).run(rank_moe_errors)


@pytest.mark.gpu(1)
def test_moe_grouped_gemm_bf16_one_gpu(rank_pool):
    """bf16 on a Hopper GPU takes torch._grouped_mm for the experts (the loop elsewhere): same results
    as the dense reference within bf16 rounding."""
    rank_pool(1, backend="nccl").run(rank_moe, "nvlink", 2, 1, 1, "bfloat16", 5e-2)


def rank_moe_decode(rank, R, backend, micro_batches, use_fp8, shared, graph=False):
    """``decode`` (the low-latency kernels, two micro-batches overlapped through the receive hooks) against
    the dense reference on the same routing, the reference reading the rows as they crossed the wire
    (fp8 round trip with use_fp8). bf16 experts on both sides: equal to bf16 rounding."""
    from deep_ep.compress import make_codec

    dev = device()
    E, H, F, K = 4 * R, 128, 48, 3
    router, gu, down, sh = _full_weights(E, H, F, shared, 21, torch.bfloat16)
    layer = ExpertParallelMoE(
        H, F, E, K, num_shared_experts=shared, buffer=get_buffer(backend), dtype=torch.bfloat16, device=dev
    ).requires_grad_(False)
    _load(layer, rank, router, gu, down, sh)
    T, Mx = [7, 0, 5, 8][rank], 8
    g = torch.Generator().manual_seed(300 + rank)

    def want(x):
        idx, w = route_tokens(x, router.to(dev), K)
        sent = make_codec(8, H).decode(make_codec(8, H).encode(x), torch.bfloat16) if use_fp8 else x
        ref = dense_moe_reference(sent, idx, w, gu.to(dev), down.to(dev))
        return ref + layer.shared(x) if shared else ref

    x = torch.randn((T, H), generator=g).to(torch.bfloat16).to(dev)
    y = layer.decode(x, Mx, micro_batches=micro_batches, use_fp8=use_fp8)
    assert y.shape == (T, H) and y.dtype == torch.bfloat16
    assert_same(
        y.float(), want(x).float(), f"decode ({micro_batches} micro-batches, fp8={use_fp8})", atol=2e-2, rtol=2e-2
    )
    if graph:  # the whole decode captured once, replayed on fresh tokens: equal to eager each time
        from tests.test_graph import _capture

        x_s = x.clone()
        g_, y_s = _capture(lambda: layer.decode(x_s, Mx, micro_batches=micro_batches, use_fp8=use_fp8))
        for trial in range(3):
            x_s.copy_(torch.randn((T, H), generator=g).to(torch.bfloat16))
            g_.replay()
            torch.cuda.synchronize()
            assert_same(
                y_s,
                layer.decode(x_s, Mx, micro_batches=micro_batches, use_fp8=use_fp8),
                f"replayed decode, trial {trial}",
            )
    with pytest.raises(deep_ep.DeepEPInputError, match="max_tokens_per_rank"):
        layer.decode(x, T - 1 if T > 1 else 0)
    with pytest.raises(deep_ep.DeepEPInputError, match="inference only"):
        with torch.enable_grad():
            layer.w_down.requires_grad_(True)
            try:
                layer.decode(x, Mx)
            finally:
                layer.w_down.requires_grad_(False)


@pytest.mark.parametrize("micro_batches,use_fp8,shared", [(2, True, 1), (1, False, 0), (2, False, 0)])
def test_moe_decode_cpu(rank_pool, micro_batches, use_fp8, shared):
    rank_pool(2).run(rank_moe_decode, "collective", micro_batches, use_fp8, shared)


@pytest.mark.gpu(1)
@pytest.mark.parametrize("micro_batches,use_fp8", [(2, True), (1, False)])
def test_moe_decode_one_gpu(rank_pool, micro_batches, use_fp8):
    """The nvlink kernel path with the grouped GEMM on packed rows; captured in a CUDA graph."""
    rank_pool(1, backend="nccl").run(rank_moe_decode, "nvlink", micro_batches, use_fp8, 1, True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["nvlink", "collective"])
def test_moe_decode_gpu(rank_pool, backend):
    rank_pool(2, backend="nccl").run(rank_moe_decode, backend, 2, True, 1, backend == "nvlink")


@pytest.mark.gpu(4)
def test_moe_decode_gpu_4_ranks(rank_pool):
    rank_pool(4, backend="nccl").run(rank_moe_decode, "nvlink", 2, True, 0, True)


@pytest.mark.gpu(1)
def test_grouped_helpers_match_loop_gpu():
    """The grouped GEMM helpers against their loops on CUDA bf16 (Hopper), with an expert without rows:
    its weight gradient is zero even where the output memory held NaN before."""
    if torch.cuda.get_device_capability() < (9, 0) or not hasattr(torch, "_grouped_mm"):
        pytest.skip("needs torch._grouped_mm on a Hopper GPU")
    from deep_ep.moe.experts import _gmm, _gmm_weight_grad

    g = torch.Generator(device="cuda").manual_seed(5)
    L, H, F = 4, 64, 48
    counts = [5, 0, 17, 3]
    P = sum(counts)
    offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    x = torch.randn((P, H), device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randn((L, F, H), device="cuda", generator=g).to(torch.bfloat16)
    dy = torch.randn((P, F), device="cuda", generator=g).to(torch.bfloat16)
    assert_same(
        _gmm(x, w, offs, None, True).float(),
        _gmm(x, w, offs, counts, False).float(),
        "grouped matmul",
        atol=2e-2,
        rtol=2e-2,
    )
    junk = torch.full((L * F * H * 4,), float("nan"), device="cuda")  # leave NaN in the allocator's free memory
    del junk
    dw = _gmm_weight_grad(dy, x, offs, None, True, L)
    assert bool((dw[1] == 0).all()), "an expert without rows must get a zero weight gradient"
    assert_same(
        dw.float(),
        _gmm_weight_grad(dy, x, offs, counts, False, L).float(),
        "grouped weight gradient",
        atol=5e-2,
        rtol=2e-2,
    )


def rank_decode_benchmark(rank, R):
    """``run`` of ``benchmarks/bench_decode.py --small`` on the pool's group (what torchrun runs)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_decode.py")
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.run(mod.parse_args(["--small", "--tokens", "8", "--warmup", "1", "--iters", "2"]))


def test_decode_benchmark_small(rank_pool):
    res = rank_pool(2).run(rank_decode_benchmark)[0]
    assert res["card"] == "cpu" and res["num_ranks"] == 2 and res["transport"] == "collective"
    assert [r["case"] for r in res["rows"]] == ["forward", "decode-1", "decode-2"]
    assert all(r["us"] > 0 for r in res["rows"])
    assert max(res["max_rel_diff_vs_decode_1"].values()) < 1e-2


def rank_manual_experts_match_autograd(rank, R, grouped):
    """The chunked pipeline's written-out experts (forward, row / weight gradients, weight gradients of
    several chunks regrouped) against autograd through ``local_experts``, on random received rows with
    -1 entries, empty experts and empty chunks. ``grouped``: force the grouped-GEMM path (torch's CPU
    ``_grouped_mm``, float32) so CI covers the code the GPU runs."""
    if grouped and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm is missing")
    dtype = torch.float32 if grouped else torch.float64
    tol = 2e-4 if grouped else 1e-10
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        L, H, F, K = [(4, 16, 8, 3), (1, 8, 16, 1), (6, 32, 24, 4)][seed % 3]
        layer = ExpertParallelMoE(H, F, L * R, K, buffer=get_buffer(), dtype=dtype)
        layer._grouped = (lambda x: True) if grouped else (lambda x: False)
        with torch.no_grad():
            layer.w_gate_up.copy_(torch.randn(layer.w_gate_up.shape, generator=g))
            layer.w_down.copy_(torch.randn(layer.w_down.shape, generator=g))
        chunks = []
        for c in range(1 + seed % 3):
            N = [0, 5, 11][(seed + c) % 3]
            ridx = torch.randint(-1, L, (N, K), generator=g)
            if seed == 4:
                ridx[ridx == L - 1] = -1  # an expert without rows
            chunks.append(
                (
                    torch.randn(N, H, generator=g).to(dtype),
                    ridx,
                    torch.rand(N, K, generator=g),
                    torch.randn(N, H, generator=g).to(dtype),
                )
            )
        parts, want_gu, want_d = [], torch.zeros_like(layer.w_gate_up), torch.zeros_like(layer.w_down)
        for rx, ridx, rw, gy in chunks:
            y, st = layer._experts_forward(rx, ridx, rw)
            gx, gw, part = layer._experts_backward(st, gy)
            parts.append(part)
            rx_a, rw_a = rx.clone().requires_grad_(), rw.clone().requires_grad_()
            with torch.enable_grad():
                layer._grouped = lambda x: False
                ya = layer.local_experts(rx_a, ridx, rw_a)
                layer._grouped = (lambda x: True) if grouped else (lambda x: False)
                ins = (rx_a, rw_a, layer.w_gate_up, layer.w_down)
                ga = [
                    gr if gr is not None else torch.zeros_like(t)
                    for gr, t in zip(torch.autograd.grad(ya, ins, gy, allow_unused=True), ins)
                ]
            assert_same(y, ya.detach(), f"forward, seed {seed}", atol=tol, rtol=tol)
            if grouped:  # local_experts (the one-chunk autograd path) on the grouped GEMM too
                with torch.no_grad():
                    assert_same(
                        layer.local_experts(rx, ridx, rw),
                        ya.detach(),
                        f"grouped local_experts, seed {seed}",
                        atol=tol,
                        rtol=tol,
                    )
            assert_same(gx, ga[0], f"grad rows, seed {seed}", atol=tol, rtol=tol)
            assert_same(gw, torch.where(ridx >= 0, ga[1], 0.0), f"grad weights, seed {seed}", atol=tol, rtol=tol)
            want_gu += ga[2]
            want_d += ga[3]
        g_gu, g_d = layer._expert_weight_grads(parts)
        assert_same(g_gu, want_gu, f"grad w_gate_up, seed {seed}", atol=tol * 10, rtol=tol)
        assert_same(g_d, want_d, f"grad w_down, seed {seed}", atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("grouped", [False, True])
def test_manual_experts_match_autograd_cpu(rank_pool, grouped):
    rank_pool(1).run(rank_manual_experts_match_autograd, grouped)


def rank_ll_experts_grouped_match_loop(rank, R):
    """``experts_low_latency``'s packed grouped-GEMM path (forced on CPU, bf16) against its loop, with NaN
    in the rows past each expert's count, an empty expert, an expert at its bound, fp8 pairs."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm is missing")
    L, H, F, K, M = 3, 128, 32, 2, 4
    RM = R * M
    layer = ExpertParallelMoE(H, F, L * R, K, buffer=get_buffer(), dtype=torch.bfloat16).requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.w_gate_up.copy_(torch.randn(layer.w_gate_up.shape, generator=g) / H**0.5)
        layer.w_down.copy_(torch.randn(layer.w_down.shape, generator=g) / F**0.5)
    x = torch.randn(L, RM, H, generator=g).to(torch.bfloat16)
    count = torch.tensor([2, 0, RM], dtype=torch.int32)
    for e, n in enumerate(count.tolist()):
        x[e, n:] = float("nan")
    outs = []
    for grouped in (True, False):
        layer._grouped = lambda t, grouped=grouped: grouped
        outs.append(layer.experts_low_latency(x, count))
    assert not outs[0].isnan().any() and not outs[1].isnan().any()
    assert_same(outs[0].float(), outs[1].float(), "grouped vs loop", atol=3e-2, rtol=3e-2)
    assert bool((outs[0][1] == 0).all()) and bool((outs[0][0, 2:] == 0).all())
    # DeepEP's fp8 pair: values and one float32 scale per 128
    vals = x.nan_to_num(0).to(torch.float8_e4m3fn)
    pair = (vals, torch.ones(L, RM, H // 128))
    assert_same(
        layer.experts_low_latency(pair, count).float(),
        layer.experts_low_latency(vals.to(torch.bfloat16), count).float(),
        "fp8 pair",
        atol=1e-6,
        rtol=0,
    )
    with pytest.raises(deep_ep.DeepEPInputError, match="bfloat16"):
        ExpertParallelMoE(H, F, L * R, K, buffer=get_buffer(), dtype=torch.float32).experts_low_latency(x, count)


def test_ll_experts_grouped_match_loop_cpu(rank_pool):
    rank_pool(1).run(rank_ll_experts_grouped_match_loop)
