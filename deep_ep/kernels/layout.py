"""Triton twin of :func:`deep_ep.layout.dispatch_layout` (``get_dispatch_layout`` on CUDA).

One launch, no memset, computes what the torch path computes with about a dozen small ops: each program
takes a block of tokens, marks the ranks (and nodes) each token goes to, stores its rows of
``is_token_in_rank`` and its per-rank, per-node and per-expert counts as one row of a scratch matrix,
then takes a ticket; the program with the last ticket sums the rows (integer sums in program order, so
the result is deterministic), stores the totals and resets the ticket to zero for the next launch. The
ticket and the scratch persist per (device, stream) (:func:`_scratch`); under CUDA-graph capture the
kernel instead adds into zeroed totals (``TICKET=False``), as it does unless the caller asks for the
ticket (the fused path; the host path keeps the GPU-proven form until the ticket has run on a GPU).
Entries ``-1`` and ids outside ``[0, num_experts)`` are skipped, as in the torch path.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..caches import keep
from .launch import Launcher


@triton.jit
def _layout_kernel(
    idx_ptr,
    counts_ptr,
    mask_ptr,
    part_ptr,
    ticket_ptr,
    T,
    K,
    L,
    P,
    W,
    R: tl.constexpr,
    RP: tl.constexpr,
    E: tl.constexpr,
    EP: tl.constexpr,
    NODES: tl.constexpr,
    NP: tl.constexpr,
    KP: tl.constexpr,
    BT: tl.constexpr,
    WP: tl.constexpr,
    TICKET: tl.constexpr,
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
    # (token, k) pairs per expert: a histogram of the block's valid ids (bin E collects the rest)
    kk = tl.arange(0, KP)
    ids = tl.load(idx_ptr + t[:, None] * K + kk[None, :], mask=tm[:, None] & (kk < K)[None, :], other=-1)
    ids = tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32)
    hist = tl.histogram(tl.reshape(ids, [BT * KP]), EP)
    bins = tl.arange(0, EP)
    if TICKET:
        row = part_ptr + pid.to(tl.int64) * W
        tl.store(row + ranks, tl.sum(hit, axis=0), mask=rm)
        tl.store(row + R + bins, hist, mask=bins < E)
        if NODES > 0:
            tl.store(row + R + E + nodes, tl.sum(node_hit, axis=0), mask=nodes < NODES)
        tl.debug_barrier()  # every thread's stores before the ticket (released with it)
        n = tl.num_programs(0)
        if tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu") == n - 1:
            cols = tl.arange(0, WP)
            cm = cols < W
            acc = tl.zeros([WP], dtype=tl.int32)
            for p in range(0, n):
                acc += tl.load(part_ptr + p * W + cols, mask=cm, other=0, cache_modifier=".cg")
            tl.store(counts_ptr + cols, acc, mask=cm)
            tl.store(ticket_ptr, 0)
    else:
        tl.atomic_add(counts_ptr + ranks, tl.sum(hit, axis=0), mask=rm)
        if NODES > 0:
            tl.atomic_add(counts_ptr + R + E + nodes, tl.sum(node_hit, axis=0), mask=nodes < NODES)
        tl.atomic_add(counts_ptr + R + bins, hist, mask=bins < E)


#: (device, stream) -> (ticket int32 [1], scratch int32 [rows * W]); see the module docstring
_SCRATCH: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
_LAUNCH = Launcher(_layout_kernel, num_warps=4)
#: per call shape: its prepared launch (:func:`prepare`)
_STATIC: Dict[Tuple, Any] = {}


def _scratch(dev: torch.device, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ticket and a scratch of at least ``n`` int32 for launches on ``dev``'s current stream."""
    key = (dev, torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0)
    got = _SCRATCH.get(key)
    if got is None or got[1].numel() < n:
        ticket = got[0] if got is not None else torch.zeros((1,), dtype=torch.int32, device=dev)
        got = (ticket, torch.empty((max(n, 4096),), dtype=torch.int32, device=dev))
        _SCRATCH[key] = got
    return got


def dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, nodes: int, ranks_per_node: int, ticket: bool = False
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``(num_tokens_per_rank int32 [R], num_tokens_per_node int32 [nodes] or None (``nodes == 0``),
    num_tokens_per_expert int32 [E], is_token_in_rank bool [T, R])`` of ``topk_idx`` ``[T, K]`` (any
    integer dtype, on the GPU): :func:`deep_ep.layout.dispatch_layout`'s integers, in one launch; with
    ``ticket`` (the fused path) without the zero fill of the totals (see the module docstring)."""
    T, K = topk_idx.shape
    return prepare(T, K, num_experts, num_ranks, nodes, ranks_per_node, ticket, topk_idx.device)(topk_idx.contiguous())


def prepare(
    T: int, K: int, num_experts: int, num_ranks: int, nodes: int, ranks_per_node: int, ticket: bool, dev: torch.device
):
    """:func:`dispatch_layout` for one shape, made once (kept here, bounded, and by a caller that repeats the
    shape): the statics of both kernel forms (the ticket one, and zeroed totals under CUDA-graph capture).

    Args:
        T, K: ``topk_idx``'s shape; num_experts, num_ranks: ``E``, ``R``; nodes: nodes (0: one node);
        ranks_per_node: ranks per node; ticket: the no-memset form where not capturing; dev: the device.

    Returns:
        A function of a contiguous integer ``topk_idx`` ``[T, K]`` on ``dev`` returning what
        :func:`dispatch_layout` returns.
    """
    key = (T, K, num_experts, num_ranks, nodes, ranks_per_node, ticket, dev)
    run = _STATIC.get(key)
    if run is not None:
        return run
    R, E = num_ranks, num_experts
    W = R + E + nodes
    cuda = dev.type == "cuda"

    def statics(capturing: bool):
        rp = max(_p2(R), 2)
        bt = max(16, min(128, 4096 // rp))
        n = -(-T // bt)
        ce = dict(
            R=R,
            RP=rp,
            E=E,
            EP=_p2(E + 1),
            NODES=nodes,
            NP=max(_p2(max(nodes, 1)), 2),
            KP=max(_p2(K), 2),
            BT=bt,
            WP=_p2(W),
            TICKET=not capturing,
        )
        return n, (n,), (T, K, E // R, max(ranks_per_node, 1), W), _LAUNCH.bind(ce)

    # the ticket (no memset) for the fused path; atomics into zeroed totals otherwise, and under capture
    zeroed = statics(True)
    fresh = statics(False) if ticket else zeroed

    def run(idx: torch.Tensor):
        in_rank = torch.empty(T, R, dtype=torch.bool, device=dev)  # (sizes as arguments: parsed faster)
        if T > 0 and K > 0:
            if ticket and not (cuda and torch.cuda.is_current_stream_capturing()):
                n, grid, ints, kernel = fresh
                counts = torch.empty(W, dtype=torch.int32, device=dev)
                tick, part = _scratch(dev, n * W)
            else:
                n, grid, ints, kernel = zeroed
                counts = torch.zeros((W,), dtype=torch.int32, device=dev)
                tick = part = counts
            kernel(grid, idx, counts, in_rank.view(torch.int8), part, tick, *ints)
        else:
            counts = torch.zeros((W,), dtype=torch.int32, device=dev)
            if T > 0:
                in_rank.zero_()
        return counts[:R], (counts[R + E :] if nodes else None), counts[R : R + E], in_rank

    return keep(_STATIC, key, run)


def _p2(n: int) -> int:
    """The next power of two of ``n`` >= 1 (``triton.next_power_of_2`` costs microseconds)."""
    return 1 << (max(int(n), 1) - 1).bit_length()
