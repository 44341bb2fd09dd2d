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
