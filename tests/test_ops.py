"""Autograd: gradients of deep_ep.ops.dispatch / combine against autograd through the reference oracle."""

from __future__ import annotations

import pytest
import torch

from deep_ep import ops
from deep_ep import reference as ref
from tests._cases import assert_same, device, get_buffer, make_case


def _expert(recv_x, recv_w, r):
    """A toy expert that uses the received weights, so their gradients flow through dispatch."""
    return recv_x * (1.0 + r) + recv_x * recv_w.sum(dim=1, keepdim=True)


def rank_autograd(rank, R, seed, worst, nbias, use_out_w, backend="collective"):
    dev = device()
    dtype = torch.float64
    case = make_case(seed, R, hidden=16, topk=3, dtype=dtype, num_experts=2 * R)
    E = case.num_experts
    g = torch.Generator().manual_seed(seed + 5)
    G = [torch.randn((t, 16), generator=g, dtype=dtype) for t in case.tokens]
    Gw = [torch.randn((t, 3), generator=g, dtype=torch.float32) for t in case.tokens]
    B = [[torch.randn((t, 16), generator=g, dtype=dtype) for _ in range(nbias)] for t in case.tokens]

    # Reference: all ranks in one process, plain autograd.
    xs = [x.clone().requires_grad_() for x in case.xs]
    ws = [w.clone().requires_grad_() for w in case.topk_weights]
    bs = [[b.clone().requires_grad_() for b in bb] for bb in B]
    exp = ref.dispatch(xs, case.topk_idx, E, ws)
    ys = [_expert(d.recv_x, d.recv_topk_weights, r) for r, d in enumerate(exp)]
    outs = ref.combine(ys, exp, case.tokens, [2 * d.recv_topk_weights for d in exp], bs)
    loss = sum((o.float() * G[s].float()).sum() for s, (o, _) in enumerate(outs))
    if use_out_w:
        loss = loss + sum((ow * Gw[s]).sum() for s, (_, ow) in enumerate(outs))
    loss.backward()

    # deep_ep on this rank.
    buf = get_buffer(backend)
    x = case.xs[rank].to(dev).requires_grad_()
    w = case.topk_weights[rank].to(dev).requires_grad_()
    b = [t.to(dev).requires_grad_() for t in B[rank]]
    worst_rows = sum(case.tokens) if worst else 0
    recv_x, recv_idx, recv_w, counts, handle = ops.dispatch(
        buf, x, case.topk_idx[rank].to(dev), w, num_experts=E, num_worst_tokens=worst_rows
    )
    y = _expert(recv_x, recv_w, rank)
    out, out_w = ops.combine(buf, y, handle, topk_weights=2 * recv_w, bias=b if b else None)
    assert_same(out, outs[rank][0], "combined", atol=1e-12, rtol=1e-12)
    my_loss = (out.float() * G[rank].to(dev).float()).sum()
    if use_out_w:
        my_loss = my_loss + (out_w * Gw[rank].to(dev)).sum()
    my_loss.backward()
    assert_same(x.grad, xs[rank].grad, "grad x", atol=1e-10, rtol=1e-10)
    assert_same(w.grad, ws[rank].grad, "grad topk_weights", atol=1e-5, rtol=1e-5)
    for i, (bb, rb) in enumerate(zip(b, bs[rank])):
        assert_same(bb.grad, rb.grad, f"grad bias {i}", atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("worst,nbias,use_out_w", [(False, 0, True), (True, 1, False), (False, 2, True)])
def test_autograd_matches_reference(rank_pool, world, worst, nbias, use_out_w):
    rank_pool(world).run(rank_autograd, 100 + world + nbias, worst, nbias, use_out_w)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["collective", "nvlink"])
def test_autograd_gpu(rank_pool, backend):
    rank_pool(2, backend="nccl").run(rank_autograd, 3, False, 1, True, backend)
