"""Conformance suite: every transport against the single-process oracle (deep_ep.reference).

A new transport joins by adding its name to ``BACKENDS`` (CPU, gloo) or
``GPU_BACKENDS`` (2 GPUs, NCCL). Each scenario draws fresh random inputs
(seeded per test) and checks every output of dispatch, cached dispatch and
combine on every rank.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import deep_ep
from deep_ep import reference as ref
from tests._cases import assert_same, device, get_buffer, make_case, to

BACKENDS = ["collective", "hierarchical"]
GPU_BACKENDS = ["collective", "nvlink", "hierarchical"]

SCENARIOS = {
    "basic": dict(),
    "align4": dict(expert_alignment=4),
    "no_weights": dict(weights=False),
    "no_topk": dict(no_topk=True),
    "fp8": dict(hidden=256, fp8=True),
    "fp8_colmajor_scales": dict(hidden=384, fp8=True, colmajor=True),
    "worst": dict(worst=True),
    "worst_on_rank0_only": dict(worst="rank0"),
    "async": dict(async_finish=True),
    "previous_event": dict(previous_event=True, async_finish=True, allocate_on_comm_stream=True),
    "bias1": dict(nbias=1),
    "bias2": dict(nbias=2),
    "one_expert": dict(pattern="one_expert", topk=2),
    "all_neg": dict(pattern="all_neg"),
    "empty_rank": dict(pattern="empty_rank"),
    "repeat": dict(pattern="repeat", topk=4),
    "all_ranks": dict(pattern="all_ranks"),
    "odd_hidden_7": dict(hidden=7),
    "odd_hidden_130": dict(hidden=130),
    "nan": dict(nan=True),
    "fp32": dict(dtype=torch.float32),
    "empty_tokens": dict(tokens="zero0"),
    "rank_valued": dict(rank_valued=True),
    "topk1": dict(topk=1),
    "topk9_16experts": dict(topk=9, num_experts=16),
    "hidden2560": dict(hidden=2560, tokens=[40, 33, 21, 9]),
    "hidden7168_fp8": dict(hidden=7168, fp8=True, tokens=[30, 17, 5, 12]),
    # A staging buffer several times smaller than the call (chunked through it on nvlink).
    "small_staging": dict(tokens=[64, 50, 37, 80], staging_data_bytes=3072),
}
# Issue 3's hidden sizes, and a staging buffer 8x smaller than the call at a real size (GPU only).
GPU_SCENARIOS = dict(
    SCENARIOS,
    **{
        "hidden2048": dict(hidden=2048, tokens=[300, 211, 5, 90]),
        "hidden4096": dict(hidden=4096, tokens=[128, 77, 64, 9]),
        "hidden7168": dict(hidden=7168, tokens=[96, 50, 33, 12]),
        "staging_8x_smaller": dict(hidden=2048, tokens=[512, 480, 0, 0], staging_data_bytes=512 * 2048 * 2 // 8),
    },
)


def run_scenario(rank: int, R: int, backend: str, seed: int, sc: dict) -> dict:
    """Dispatch + cached dispatch + combine on every rank, each output checked against the oracle."""
    dev = device()
    tokens = sc.get("tokens")
    if tokens == "zero0":
        tokens = [0] + [5 + 3 * r for r in range(1, R)]
    elif tokens is not None:
        tokens = list(tokens)[:R]
    num_experts = sc.get("num_experts", 4 * R if R > 2 else 8)
    case = make_case(
        seed,
        R,
        num_experts=num_experts,
        hidden=sc.get("hidden", 64),
        topk=sc.get("topk", 3),
        tokens=tokens,
        pattern=sc.get("pattern", "random"),
        dtype=sc.get("dtype", torch.bfloat16),
        fp8=sc.get("fp8", False),
        rank_valued=sc.get("rank_valued", False),
    )
    if sc.get("nan"):
        for x in case.xs:
            if x.size(0):
                x[0, 0] = float("nan")
                x[-1, -1] = float("inf")
    E = case.num_experts
    kw = {}
    if sc.get("staging_data_bytes"):  # metadata area (2 x R x 4096 int64) + a small data area
        kw["num_nvl_bytes"] = 2 * R * 4096 * 8 + sc["staging_data_bytes"]
    P = 0
    if backend == "hierarchical":  # emulated nodes: 2 of R/2 ranks (2 x 1 on two ranks)
        P = kw["ranks_per_node"] = sc.get("ranks_per_node") or (max(R // 2, 1) if R % 2 == 0 else 1)
        kw.pop("num_nvl_bytes", None)
    buf = get_buffer(backend, **kw)
    use_topk = not sc.get("no_topk")
    use_w = sc.get("weights", True) and use_topk
    xs = case.fp8 if case.fp8 is not None else case.xs
    in_rank_all = [ref.expert_rank_mask(t, E, R) for t in case.topk_idx]
    worst = sum(case.tokens) if sc.get("worst") else 0
    if sc.get("worst") == "rank0" and rank != 0:  # ranks may choose differently
        worst = 0
    align = sc.get("expert_alignment", 1)
    exp = ref.dispatch(
        xs,
        case.topk_idx if use_topk else None,
        E,
        case.topk_weights if use_w else None,
        is_token_in_rank=None if use_topk else in_rank_all,
        expert_alignment=align,
        num_worst_tokens=worst,
    )
    e = exp[rank]
    x = to(xs[rank], dev)
    if sc.get("colmajor"):
        v, s = x
        x = (v, s.t().contiguous().t())
        assert not x[1].is_contiguous()
    idx = case.topk_idx[rank].to(dev)
    w = case.topk_weights[rank].to(dev) if use_w else None
    async_finish = sc.get("async_finish", False)
    prev = buf.capture() if sc.get("previous_event") else None

    per_rank, per_node, per_expert, in_rank, ev = buf.get_dispatch_layout(idx, E)
    if P and P < R:  # num_tokens_per_rdma_rank: tokens per node
        want_node = in_rank_all[rank].view(-1, R // P, P).any(dim=2).sum(0).to(torch.int32)
        assert_same(per_node, want_node, "num_tokens_per_rdma_rank (per node)")
    else:
        assert per_node is None
    assert_same(in_rank, in_rank_all[rank], "is_token_in_rank")
    assert_same(per_rank, in_rank_all[rank].sum(0).to(torch.int32), "num_tokens_per_rank")
    exp_pe = torch.zeros(E, dtype=torch.int32, device="cpu")
    for v in case.topk_idx[rank].flatten().tolist():
        if v >= 0:
            exp_pe[v] += 1
    assert_same(per_expert, exp_pe, "num_tokens_per_expert")

    kwargs = dict(
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        expert_alignment=align,
        num_worst_tokens=worst,
        previous_event=prev,
        async_finish=async_finish,
        allocate_on_comm_stream=sc.get("allocate_on_comm_stream", False),
    )
    if use_topk:
        kwargs.update(num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w)
    recv_x, recv_idx, recv_w, counts, handle, event = buf.dispatch(x, **kwargs)
    assert isinstance(event, deep_ep.EventOverlap)
    if async_finish:
        event.current_stream_wait()
    assert_same(recv_x, e.recv_x, "recv_x")
    assert_same(handle[0], e.rank_prefix_matrix, "rank_prefix_matrix")
    assert handle[0].dtype == torch.int32
    if use_topk:
        assert_same(recv_idx, e.recv_topk_idx, "recv_topk_idx")
        if use_w:
            assert_same(recv_w, e.recv_topk_weights, "recv_topk_weights")
        else:
            assert recv_w is None
        assert counts == e.num_recv_tokens_per_expert_list, (counts, e.num_recv_tokens_per_expert_list)
    else:
        assert recv_idx is None and recv_w is None and counts == []

    # Cached dispatch: same layout, x only.
    cx, c1, c2, c3, c4, cev = buf.dispatch(x, handle=handle, async_finish=async_finish)
    assert (c1, c2, c3, c4) == (None, None, None, None)
    if async_finish:
        cev.current_stream_wait()
    assert_same(cx, e.recv_x, "cached recv_x")

    # Combine: each rank returns a function of what it received (rank-dependent), plus biases.
    if isinstance(e.recv_x, tuple):
        ys = [
            d.recv_x[0]
            .float()
            .view(d.recv_x[0].size(0), d.recv_x[0].size(1) // 128, 128)
            .mul(d.recv_x[1].unsqueeze(2))
            .view(d.recv_x[0].size(0), -1)
            .to(torch.bfloat16)
            for d in exp
        ]
    else:
        ys = [(d.recv_x.float() * (1.0 + 0.5 * r)).to(d.recv_x.dtype) for r, d in enumerate(exp)]
    nbias = sc.get("nbias", 0)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    biases = [
        [torch.randn((case.tokens[s], ys[0].size(1)), generator=g, device="cpu").to(ys[0].dtype) for _ in range(nbias)]
        for s in range(R)
    ]
    ws = [d.recv_topk_weights for d in exp] if use_w else None
    exp_c = ref.combine(ys, exp, case.tokens, ws, biases, ranks_per_node=P)
    bias_arg = None
    if nbias == 1:
        bias_arg = biases[rank][0].to(dev)
    elif nbias == 2:
        bias_arg = tuple(b.to(dev) for b in biases[rank])
    prev2 = buf.capture() if sc.get("previous_event") else None
    out, out_w, cev2 = buf.combine(
        ys[rank].to(dev),
        handle,
        topk_weights=recv_w if use_w else None,
        bias=bias_arg,
        previous_event=prev2,
        async_finish=async_finish,
        allocate_on_comm_stream=sc.get("allocate_on_comm_stream", False),
    )
    if async_finish:
        cev2.current_stream_wait()
    assert_same(out, exp_c[rank][0], "combined_x")
    if use_w:
        assert_same(out_w, exp_c[rank][1], "combined_topk_weights")
        # Summing each token's weights over ranks gives back the original weights (-1 entries: 0).
        orig = torch.where(case.topk_idx[rank] >= 0, case.topk_weights[rank], torch.zeros((), device="cpu"))
        assert_same(out_w, orig, "combined weights == original weights", atol=1e-6, rtol=1e-6)
    else:
        assert out_w is None
    return {"recv": e.num_recv_tokens}


def run_reuse_shapes(rank: int, R: int, backend: str, seed: int) -> None:
    """One Buffer, several calls with different shapes and dtypes in a row."""
    for i, (hidden, topk, dtype) in enumerate(
        [(32, 2, torch.bfloat16), (130, 4, torch.float32), (8, 1, torch.bfloat16), (256, 3, torch.float16)]
    ):
        run_scenario(rank, R, backend, seed + 17 * i, dict(hidden=hidden, topk=topk, dtype=dtype))


#: the nvlink transport on CPU ranks (shared-memory emulation: its host path, its device path with the
#: kernels' torch twins): the scenarios that exercise its own code
EMULATED_NVLINK = [
    "basic",
    "fp8",
    "worst",
    "worst_on_rank0_only",
    "bias2",
    "empty_rank",
    "odd_hidden_7",
    "nan",
    "small_staging",
    "no_topk",
    "empty_tokens",
    "one_expert",
]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", EMULATED_NVLINK)
def test_conformance_emulated_nvlink(rank_pool, world, name):
    seed = zlib.crc32(f"{name}/{world}/nvlink".encode())
    rank_pool(world).run(run_scenario, "nvlink", seed, SCENARIOS[name])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_conformance_cpu(rank_pool, backend, world, name):
    seed = zlib.crc32(f"{name}/{world}".encode())
    rank_pool(world).run(run_scenario, backend, seed, SCENARIOS[name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_reuse_shapes_cpu(rank_pool, backend):
    rank_pool(2).run(run_reuse_shapes, backend, 1234)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_rank(rank_pool, backend):
    rank_pool(1).run(run_scenario, backend, 7, dict(num_experts=4))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", list(GPU_SCENARIOS))
def test_conformance_gpu(rank_pool, backend, name):
    seed = zlib.crc32(f"{name}/gpu".encode())
    rank_pool(2, backend="nccl").run(run_scenario, backend, seed, GPU_SCENARIOS[name])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_reuse_shapes_gpu(rank_pool, backend):
    rank_pool(2, backend="nccl").run(run_reuse_shapes, backend, 99)


@pytest.mark.gpu(1)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", ["basic", "fp8", "worst", "bias2", "nan"])
def test_single_rank_gpu(rank_pool, backend, name):
    """One rank on one GPU: every transport's CUDA path (no peer)."""
    rank_pool(1, backend="nccl").run(run_scenario, backend, 11, dict(GPU_SCENARIOS[name], num_experts=4))


def run_scenarios_pushed(rank: int, R: int, names: list) -> None:
    """The nvlink transport's push dispatch (``DEEP_EP_NVLINK_DISPATCH=push``, 2 and 1 chunks) on a Buffer
    of its own, each scenario checked against the oracle as above."""
    import os

    from tests._cases import WORKER_CACHE

    for chunks in ("2", "1"):
        os.environ.update(DEEP_EP_NVLINK_DISPATCH="push", DEEP_EP_NVLINK_PUSH_CHUNKS=chunks)
        saved = dict(WORKER_CACHE)
        WORKER_CACHE.clear()
        try:
            for name in names:
                run_scenario(rank, R, "nvlink", zlib.crc32(f"{name}/push{chunks}".encode()), GPU_SCENARIOS[name])
            made = [b for b in WORKER_CACHE.values() if isinstance(b, deep_ep.Buffer)]
            assert made and all(b._transport.push for b in made), "the Buffers did not take the push setting"
            for b in made:
                b.destroy()
        finally:
            WORKER_CACHE.clear()
            WORKER_CACHE.update(saved)
            os.environ.pop("DEEP_EP_NVLINK_DISPATCH", None)
            os.environ.pop("DEEP_EP_NVLINK_PUSH_CHUNKS", None)


@pytest.mark.gpu
def test_conformance_push_dispatch_gpu(rank_pool):
    rank_pool(2, backend="nccl").run(
        run_scenarios_pushed,
        [
            "basic",
            "fp8",
            "hidden7168",
            "empty_rank",
            "all_ranks",
            "small_staging",
            "staging_8x_smaller",
            "async",
            "previous_event",
            "worst",
            "nan",
            "odd_hidden_130",
        ],
    )


@pytest.mark.gpu(4)
@pytest.mark.parametrize("world", [3, 4])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", ["basic", "fp8", "empty_rank", "worst", "staging_8x_smaller", "bias2"])
def test_conformance_gpu_more_ranks(rank_pool, world, backend, name):
    """3 and 4 ranks (hierarchical: 2 emulated nodes x 2 at 4 ranks, 3 x 1 at 3): the peer loops, per-peer
    streams and schedules past one peer. On one GPU: ``DEEP_EP_TEST_SHARE_GPU=4``."""
    seed = zlib.crc32(f"{name}/gpu{world}".encode())
    rank_pool(world, backend="nccl").run(run_scenario, backend, seed, GPU_SCENARIOS[name])


@pytest.mark.gpu(4)
def test_conformance_push_dispatch_gpu_4_ranks(rank_pool):
    rank_pool(4, backend="nccl").run(
        run_scenarios_pushed, ["basic", "fp8", "empty_rank", "staging_8x_smaller", "worst"]
    )
