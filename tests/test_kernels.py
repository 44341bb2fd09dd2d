"""Triton kernels against the torch paths they speed up (GPU only), on fresh random inputs."""
from __future__ import annotations

import os

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T,H,R,nb", [(1, 7, 1, 0), (37, 130, 2, 1), (513, 7168, 2, 2), (64, 2048, 8, 0), (0, 64, 2, 0)])
def test_reduce_rows_kernel_matches_torch(dtype, T, H, R, nb):
    from deep_ep.kernels import reduce as kreduce
    from deep_ep.transport import base
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


def rank_nvlink_kernel_vs_torch(rank, R, staging_data_bytes):
    """nvlink dispatch with the Triton store kernel equals the torch path bit for bit."""
    from deep_ep import reference as ref
    from tests._cases import assert_same, device, get_buffer, make_case
    dev = device()
    kw = {"num_nvl_bytes": 2 * R * 4096 * 8 + staging_data_bytes} if staging_data_bytes else {}
    buf = get_buffer("nvlink", **kw)
    case = make_case(77 + staging_data_bytes, R, hidden=1000, topk=4, tokens=[300, 211, 5, 90][:R], num_experts=16)
    x = case.xs[rank].to(dev)
    idx = case.topk_idx[rank].to(dev)
    w = case.topk_weights[rank].to(dev)
    outs = []
    os.environ["DEEP_EP_NVLINK_KERNEL"] = "1"
    for disable in ("1", ""):
        os.environ["DEEP_EP_DISABLE_TRITON"] = disable
        try:
            per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 16)
            outs.append(buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                     num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w)[:4])
        finally:
            os.environ.pop("DEEP_EP_DISABLE_TRITON", None)
    os.environ.pop("DEEP_EP_NVLINK_KERNEL", None)
    (a, ai, aw, al), (b, bi, bw, bl) = outs
    assert torch.equal(a, b) and torch.equal(ai, bi) and torch.equal(aw, bw) and al == bl
    e = ref.dispatch(case.xs, case.topk_idx, 16, case.topk_weights)[rank]
    assert_same(b, e.recv_x, "recv_x (kernel)")


@pytest.mark.gpu
@pytest.mark.parametrize("staging_data_bytes", [0, 20000])
def test_nvlink_dispatch_kernel_matches_torch(rank_pool, staging_data_bytes):
    rank_pool(2, backend="nccl").run(rank_nvlink_kernel_vs_torch, staging_data_bytes)
