"""Layout math (deep_ep.layout) against brute force and the oracle, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch

from deep_ep import layout
from deep_ep import reference as ref


def _random_topk(seed, T, K, E, neg=0.2):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, E, (T, K), generator=g)
    idx[torch.rand((T, K), generator=g) < neg] = -1
    return idx


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("R", [1, 2, 3, 8])
def test_dispatch_layout_brute_force(seed, R):
    E = R * (1 + seed % 3)
    T = 5 * seed
    K = 1 + seed % 4
    idx = _random_topk(seed * 7 + R, T, K, E)
    per_rank, per_node, per_expert, in_rank = layout.dispatch_layout(idx, E, R)
    L = E // R
    for t in range(T):
        for r in range(R):
            want = any(0 <= e and e // L == r for e in idx[t].tolist())
            assert bool(in_rank[t, r]) == want
    assert per_node is None
    assert per_rank.dtype == torch.int32 and per_expert.dtype == torch.int32 and in_rank.dtype == torch.bool
    assert per_rank.tolist() == [int(in_rank[:, r].sum()) for r in range(R)]
    assert per_expert.tolist() == [int((idx == e).sum()) for e in range(E)]
    assert torch.equal(in_rank, ref.expert_rank_mask(idx, E, R))


def test_layout_per_node_counts():
    idx = torch.tensor([[0, 1], [2, 7], [-1, -1], [6, 4]])
    per_rank, per_node, _, in_rank = layout.dispatch_layout(idx, 8, 4, ranks_per_node=2)
    assert per_rank.tolist() == [1, 1, 1, 2]
    assert per_node.tolist() == [2, 2]  # token 3 counted once on node 1 though it has two ranks there


def test_layout_ignores_out_of_range_ids():
    idx = torch.tensor([[0, 9], [-5, 3]])
    per_rank, _, per_expert, in_rank = layout.dispatch_layout(idx, 4, 2)
    assert per_rank.tolist() == [1, 1] and per_expert.tolist() == [1, 0, 0, 1]


def test_prefix_slots_and_order():
    g = torch.Generator().manual_seed(3)
    in_rank = torch.rand((13, 3), generator=g) < 0.5
    slots = layout.token_slots(in_rank)
    for r in range(3):
        seen = 0
        for t in range(13):
            if in_rank[t, r]:
                assert int(slots[t, r]) == seen
                seen += 1
            else:
                assert int(slots[t, r]) == -1
    order = layout.send_order(in_rank)
    want = [t for r in range(3) for t in range(13) if in_rank[t, r]]
    assert order.tolist() == want
    counts = torch.tensor([[1, 2], [3, 4]], dtype=torch.int32)
    assert layout.rank_prefix_matrix(counts).tolist() == [[1, 2], [4, 6]]


def test_localize_and_align():
    idx = torch.tensor([[0, 3, 5, -1]])
    w = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    local, lw = layout.localize_topk(idx, w, rank=1, num_local=2)
    assert local.tolist() == [[-1, 1, -1, -1]]
    assert torch.equal(lw, torch.tensor([[0.0, 0.2, 0.0, 0.0]]))
    assert layout.aligned_expert_counts([0, 1, 16, 17], 16) == [0, 16, 16, 32]


def test_check_topk_idx_messages():
    with pytest.raises(TypeError, match="int64"):
        layout.check_topk_idx(torch.zeros((2, 2), dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="outside"):
        layout.check_topk_idx(torch.tensor([[4]]), 4)
    with pytest.raises(ValueError, match="not divisible"):
        layout.num_local_experts(6, 4)
    layout.check_topk_idx(torch.tensor([[-1, 3]]), 4)


@pytest.mark.parametrize("bad", [0, -1, 2.0])
def test_dispatch_layout_rejects_bad_ranks_per_node(bad):
    from deep_ep.errors import DeepEPInputError

    idx = torch.zeros((3, 2), dtype=torch.int64)
    with pytest.raises(DeepEPInputError, match="ranks_per_node"):
        layout.dispatch_layout(idx, 4, 2, ranks_per_node=bad)
