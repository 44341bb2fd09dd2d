"""The oracle itself, on a case small enough to check by hand."""

from __future__ import annotations

import torch

from deep_ep import reference as ref


def test_reference_by_hand():
    # 2 ranks, 4 experts (2 per rank). Rank 0 has 3 tokens, rank 1 has 2.
    x0 = torch.tensor([[1.0], [2.0], [3.0]])
    x1 = torch.tensor([[10.0], [20.0]])
    i0 = torch.tensor([[0, 3], [1, -1], [2, 2]])  # t0 -> ranks 0,1; t1 -> rank 0; t2 -> rank 1 (expert 2 twice)
    i1 = torch.tensor([[3, -1], [-1, -1]])  # t0 -> rank 1; t1 -> nowhere
    w0 = torch.tensor([[0.5, 0.25], [1.0, 0.0], [0.1, 0.2]])
    w1 = torch.tensor([[0.7, 0.3], [0.0, 0.0]])
    out = ref.dispatch([x0, x1], [i0, i1], 4, [w0, w1], expert_alignment=2)
    r0, r1 = out
    assert r0.recv_x.flatten().tolist() == [1.0, 2.0]
    assert r1.recv_x.flatten().tolist() == [1.0, 3.0, 10.0]
    assert r0.recv_topk_idx.tolist() == [[0, -1], [1, -1]]
    assert r1.recv_topk_idx.tolist() == [[-1, 1], [0, 0], [1, -1]]
    assert r1.recv_topk_weights.tolist() == [
        [0.0, 0.25],
        [0.10000000149011612, 0.20000000298023224],
        [0.699999988079071, 0.0],
    ]
    assert r0.num_recv_tokens_per_expert_list == [2, 2]  # [1, 1] aligned to 2
    assert r1.num_recv_tokens_per_expert_list == [2, 2]  # expert 2 named twice by t2 -> 2; expert 3 -> 2
    assert r0.rank_prefix_matrix.tolist() == [[2, 2], [2, 3]]
    ys = [r0.recv_x * 2, r1.recv_x * 3]
    (c0, w_0), (c1, w_1) = ref.combine(
        ys, out, [3, 2], [r0.recv_topk_weights, r1.recv_topk_weights], [[torch.ones(3, 1)], []]
    )
    assert c0.flatten().tolist() == [1 * 2 + 1 * 3 + 1, 2 * 2 + 1, 3 * 3 + 1]
    assert c1.flatten().tolist() == [30.0, 0.0]
    assert torch.allclose(w_0, torch.where(i0 >= 0, w0, torch.zeros(())))
    padded = ref.dispatch([x0, x1], [i0, i1], 4, num_worst_tokens=5)
    assert padded[0].recv_x.shape == (5, 1) and padded[0].recv_topk_idx[2:].eq(-1).all()
    assert padded[0].num_recv_tokens_per_expert_list == []
