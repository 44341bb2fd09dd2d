"""SparseCollective (the seed's API) against the reference oracle."""

from __future__ import annotations

import pytest
import torch

import deep_ep
from deep_ep import reference as ref
from tests._cases import assert_same, device, get_buffer


def rank_sparse(rank, R, seed, k, infer_experts):
    dev = device()
    g = torch.Generator().manual_seed(seed)
    E = 2 * R
    tokens = [int(torch.randint(0, 12, (1,), generator=g)) for _ in range(R)]
    tables = [torch.randint(-1, E, (t, k) if k > 1 else (t,), generator=g) for t in tokens]
    xs = [torch.randn((t, 8), generator=g, dtype=torch.float64) for t in tokens]
    idx2 = [t if t.dim() == 2 else t.unsqueeze(1) for t in tables]
    if infer_experts:  # inferred from the group-wide max id
        E_used = max(int(t.max()) if t.numel() else -1 for t in tables) + 1
        E = max((E_used + R - 1) // R * R, R)
    exp = ref.dispatch(xs, idx2, E)
    op = deep_ep.SparseCollective(tables[rank].to(dev), num_experts=None if infer_experts else E, buffer=get_buffer())
    assert op.num_experts == E
    masks = [ref.expert_rank_mask(t, E, R) for t in idx2]
    traffic = torch.tensor([[int(m[:, j].sum()) for j in range(R)] for m in masks], dtype=torch.int64)
    assert torch.equal(op.traffic, traffic), (op.traffic, traffic)
    assert op.density == pytest.approx(float((traffic > 0).sum()) / R**2)
    x = xs[rank].to(dev).requires_grad_()
    recv = op.all_to_all(x)
    assert_same(recv, exp[rank].recv_x, "all_to_all rows")
    assert_same(op.recv_expert_idx, exp[rank].recv_topk_idx, "recv_expert_idx")
    back = op.reverse(recv * 3.0)
    n_ranks = masks[rank].sum(dim=1, keepdim=True).to(device=dev, dtype=torch.float64)
    assert_same(back, xs[rank].to(dev) * 3.0 * n_ranks, "reverse(all_to_all(x))", atol=1e-12, rtol=1e-12)
    back.sum().backward()
    assert_same(x.grad, (3.0 * n_ranks).expand_as(xs[rank]).contiguous(), "grad", atol=1e-12, rtol=1e-12)


def rank_sparse_compressed(rank, R):
    """compression_ratio: rows cross in the 'auto' format at that ratio (what arrives is the reference
    dispatch of the decoded rows); the reverse and the gradient stay 16-bit (straight through)."""
    from deep_ep.compress import make_codec

    dev = device()
    g = torch.Generator().manual_seed(5)
    E, H = 2 * R, 256
    tokens = [7, 12, 5, 9][:R]
    tables = [torch.randint(-1, E, (t, 2), generator=g) for t in tokens]
    xs = [torch.randn((t, H), generator=g) for t in tokens]
    codec = make_codec("auto", H, ratio=0.3)
    exp = ref.dispatch([codec.roundtrip(x) for x in xs], tables, E)
    op = deep_ep.SparseCollective(tables[rank].to(dev), num_experts=E, compression_ratio=0.3, buffer=get_buffer())
    x = xs[rank].to(dev).requires_grad_()
    recv = op.all_to_all(x)
    assert_same(recv, exp[rank].recv_x, "compressed all_to_all rows")
    assert not torch.equal(recv.detach().cpu(), ref.dispatch(xs, tables, E)[rank].recv_x) or recv.numel() == 0
    op.reverse(recv * 3.0).sum().backward()
    n_ranks = ref.expert_rank_mask(tables[rank], E, R).sum(dim=1, keepdim=True).float()
    assert_same(x.grad.cpu(), (3.0 * n_ranks).expand(tokens[rank], H).contiguous(), "grad")


def test_sparse_collective_compressed(rank_pool):
    rank_pool(2).run(rank_sparse_compressed)


def rank_sparse_errors(rank, R):
    with pytest.raises(ValueError, match="compression_ratio"):
        deep_ep.SparseCollective(torch.zeros(4, dtype=torch.int64), num_experts=2 * R, compression_ratio=1.5)
    with pytest.raises(ValueError, match="integer"):
        deep_ep.SparseCollective(torch.zeros(4), num_experts=2 * R)


@pytest.mark.parametrize("k,infer", [(1, False), (3, False), (2, True)])
def test_sparse_collective(rank_pool, k, infer):
    rank_pool(2).run(rank_sparse, 40 + k, k, infer)


def test_sparse_collective_4(rank_pool):
    rank_pool(4).run(rank_sparse, 77, 2, False)


def test_sparse_errors(rank_pool):
    rank_pool(2).run(rank_sparse_errors)


@pytest.mark.gpu
def test_sparse_collective_gpu(rank_pool):
    rank_pool(2, backend="nccl").run(rank_sparse, 5, 2, False)
