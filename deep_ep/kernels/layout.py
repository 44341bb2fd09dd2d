"""Triton twin of :func:`deep_ep.layout.dispatch_layout` (``get_dispatch_layout`` on CUDA).

One launch (after one zero fill of the counters) computes what the torch path computes with about a
dozen small ops: each program takes a block of tokens, marks the ranks (and nodes) each token goes to,
stores its rows of ``is_token_in_rank`` and adds its per-rank, per-node and per-expert counts to the
totals (one atomic add per counter per program: integer sums, so the result does not depend on the
order). Entries ``-1`` and ids outside ``[0, num_experts)`` are skipped, as in the torch path.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _layout_kernel(
    idx_ptr,
    counts_ptr,
    mask_ptr,
    T,
    K,
    L,
    P,
    R: tl.constexpr,
    RP: tl.constexpr,
    E: tl.constexpr,
    EP: tl.constexpr,
    NODES: tl.constexpr,
    NP: tl.constexpr,
    KP: tl.constexpr,
    BT: tl.constexpr,
):
    pid = tl.program_id(0)
    t = (pid * BT + tl.arange(0, BT)).to(tl.int64)
    tm = t < T
    ranks = tl.arange(0, RP)
    hit = tl.zeros([BT, RP], dtype=tl.int32)
    if NODES > 0:
        nodes = tl.arange(0, NP)
        node_hit = tl.zeros([BT, NP], dtype=tl.int32)
    for k in tl.static_range(KP):
        e = tl.load(idx_ptr + t * K + k, mask=tm & (k < K), other=-1)
        ok = (e >= 0) & (e < E)
        r = tl.where(ok, e // L, -1)
        hit = tl.maximum(hit, (r[:, None] == ranks[None, :]).to(tl.int32))
        if NODES > 0:
            node_hit = tl.maximum(node_hit, ((r // P)[:, None] == nodes[None, :]).to(tl.int32) * (r >= 0)[:, None])
    rm = ranks < R
    tl.store(mask_ptr + t[:, None] * R + ranks[None, :], hit.to(tl.int8), mask=tm[:, None] & rm[None, :])
    tl.atomic_add(counts_ptr + ranks, tl.sum(hit, axis=0), mask=rm)
    if NODES > 0:
        tl.atomic_add(counts_ptr + R + E + nodes, tl.sum(node_hit, axis=0), mask=nodes < NODES)
    # (token, k) pairs per expert: a histogram of the block's valid ids (bin E collects the rest)
    kk = tl.arange(0, KP)
    ids = tl.load(idx_ptr + t[:, None] * K + kk[None, :], mask=tm[:, None] & (kk < K)[None, :], other=-1)
    ids = tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32)
    hist = tl.histogram(tl.reshape(ids, [BT * KP]), EP)
    bins = tl.arange(0, EP)
    tl.atomic_add(counts_ptr + R + bins, hist, mask=bins < E)


def dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, nodes: int, ranks_per_node: int
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``(num_tokens_per_rank int32 [R], num_tokens_per_node int32 [nodes] or None (``nodes == 0``),
    num_tokens_per_expert int32 [E], is_token_in_rank bool [T, R])`` of ``topk_idx`` ``[T, K]`` (any
    integer dtype, on the GPU): :func:`deep_ep.layout.dispatch_layout`'s integers, in one launch."""
    T, K = topk_idx.shape
    R, E = num_ranks, num_experts
    dev = topk_idx.device
    idx = topk_idx.contiguous()
    counts = torch.zeros((R + E + nodes,), dtype=torch.int32, device=dev)
    in_rank = torch.empty((T, R), dtype=torch.bool, device=dev)
    if T > 0 and K > 0:
        rp = max(triton.next_power_of_2(R), 2)
        kp = max(triton.next_power_of_2(K), 2)
        bt = max(16, min(128, 4096 // rp))
        _layout_kernel[(triton.cdiv(T, bt),)](
            idx,
            counts,
            in_rank.view(torch.int8),
            T,
            K,
            E // R,
            max(ranks_per_node, 1),
            R=R,
            RP=rp,
            E=E,
            EP=triton.next_power_of_2(E + 1),
            NODES=nodes,
            NP=max(triton.next_power_of_2(max(nodes, 1)), 2),
            KP=kp,
            BT=bt,
            num_warps=4,
        )
    elif T > 0:
        in_rank.zero_()
    return counts[:R], (counts[R + E :] if nodes else None), counts[R : R + E], in_rank
