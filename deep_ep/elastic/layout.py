"""Index math of the V2 layouts, in plain torch, with no host synchronisation.

Every function here is local (no communication) and works the same on CPU and
CUDA. None reads a device value on the host: shapes come from the caller, so
the ``do_cpu_sync=False`` path of :class:`deep_ep.ElasticBuffer` never waits.

Notation: ``R`` ranks, ``L`` experts per rank, ``K`` top-k, ``T`` tokens of this
rank, ``n`` rows this rank received (padding included), ``Ne`` rows of the
expanded layout, ``a`` the expert alignment.
"""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = [
    "align_up",
    "source_counts",
    "row_sources",
    "scaleup_psum",
    "expert_counts",
    "expert_psum",
    "expand_slots",
    "slot_pairs",
    "gather_rows",
    "master_topk",
    "sender_slots",
    "home_row_positions",
    "home_pair_positions",
    "worst_expanded_rows",
]


def align_up(value: int, alignment: int) -> int:
    """``value`` rounded up to a multiple of ``alignment`` (ints).

    Args:
        value: a non-negative int.
        alignment: a positive int.

    Returns:
        The smallest multiple of ``alignment`` that is ``>= value``.
    """
    return (value + alignment - 1) // alignment * alignment


def worst_expanded_rows(num_ranks: int, num_max_tokens_per_rank: int, num_topk: int, num_local_experts: int, a: int):
    """Rows of the expanded layout when the counts are unknown on the host (``do_cpu_sync=False``).

    Every (token, local expert) pair of every rank may land here, plus one partial
    alignment block per expert.

    Args:
        num_ranks: R.
        num_max_tokens_per_rank: the per-rank token bound every rank uses.
        num_topk: K.
        num_local_experts: L.
        a: the expert alignment.

    Returns:
        An int, a multiple of ``a``.
    """
    pairs = num_ranks * num_max_tokens_per_rank * min(num_topk, num_local_experts)
    return align_up(pairs + (a - 1) * num_local_experts, a)


def source_counts(rank_prefix_matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Rows this rank receives from each source rank.

    Args:
        rank_prefix_matrix: int32 ``[R, R]``, ``[i][j]`` = tokens ranks ``0..i`` send to rank ``j``
            (element 0 of a :class:`deep_ep.Buffer` dispatch handle).
        rank: this rank.

    Returns:
        int64 ``[R]``: rows from each source rank.
    """
    col = rank_prefix_matrix[:, rank].to(torch.int64)
    prev = torch.cat([torch.zeros((1,), dtype=torch.int64, device=col.device), col[:-1]])
    return col - prev


def row_sources(counts: torch.Tensor, num_rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Source rank of every received row (rows grouped by source rank ascending).

    Args:
        counts: int64 ``[R]`` rows per source rank.
        num_rows: rows of the received tensors (padding rows beyond ``counts.sum()`` included).

    Returns:
        ``(src_rank, valid)``: int64 ``[num_rows]`` (-1 on padding rows) and bool ``[num_rows]``.
    """
    bounds = torch.cumsum(counts, dim=0)
    rows = torch.arange(num_rows, dtype=torch.int64, device=counts.device)
    src = torch.searchsorted(bounds, rows, right=True)
    valid = src < counts.numel()
    return torch.where(valid, src, torch.full_like(src, -1)), valid


def scaleup_psum(counts: torch.Tensor, num_scaleup_ranks: int) -> torch.Tensor:
    """V2's ``psum_num_recv_tokens_per_scaleup_rank``: inclusive prefix sum, over scale-up peers, of the
    rows received from every rank with that scale-up index (``rank % num_scaleup_ranks``).

    Args:
        counts: int64 ``[R]`` rows per source rank.
        num_scaleup_ranks: ranks per scale-up domain (R on one flat domain).

    Returns:
        int32 ``[num_scaleup_ranks]``; the last element is the number of received rows.
    """
    R = counts.numel()
    idx = torch.arange(R, dtype=torch.int64, device=counts.device) % num_scaleup_ranks
    per = torch.zeros((num_scaleup_ranks,), dtype=torch.int64, device=counts.device).index_add_(0, idx, counts)
    return torch.cumsum(per, dim=0).to(torch.int32)


def expert_counts(recv_topk_idx: torch.Tensor, num_local_experts: int) -> torch.Tensor:
    """(row, k) pairs naming each local expert.

    Args:
        recv_topk_idx: int64 ``[n, K]`` local expert ids, -1 for none (padding rows are all -1).
        num_local_experts: L.

    Returns:
        int64 ``[L]`` unaligned counts.
    """
    flat = recv_topk_idx.reshape(-1).to(torch.int64) + 1
    out = torch.zeros((num_local_experts + 1,), dtype=torch.int64, device=recv_topk_idx.device)
    out.scatter_add_(0, flat, torch.ones_like(flat))
    return out[1:]


def expert_psum(counts: torch.Tensor, alignment: int, expanded: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """V2's ``psum_num_recv_tokens_per_expert`` and each expert's first row in the expanded layout.

    Args:
        counts: int64 ``[L]`` unaligned (row, k) pairs per local expert.
        alignment: the expert alignment ``a``.
        expanded: the expanded layout's convention (start of expert ``i`` plus its real count) instead of
            the inclusive prefix sum of the aligned counts.

    Returns:
        ``(psum, starts)``: int32 ``[L]`` and int64 ``[L]`` (segment starts, multiples of ``a``).
    """
    aligned = (counts + alignment - 1) // alignment * alignment
    ends = torch.cumsum(aligned, dim=0)
    starts = ends - aligned
    psum = starts + counts if expanded else ends
    return psum.to(torch.int32), starts


def expand_slots(recv_topk_idx: torch.Tensor, counts: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Row of every (received row, k) pair in the expanded layout.

    Expert ``e``'s pairs fill rows ``starts[e] ..`` in received-row order (then ``k``), so the layout is
    deterministic: sorted by source rank, then source token, within every expert.

    Args:
        recv_topk_idx: int64 ``[n, K]`` local expert ids (-1: none).
        counts: int64 ``[L]`` pairs per expert (:func:`expert_counts`).
        starts: int64 ``[L]`` first row of each expert (:func:`expert_psum`).

    Returns:
        int64 ``[n, K]``: the expanded row of each pair, -1 where the id is -1.
    """
    n, K = recv_topk_idx.shape
    L = counts.numel()
    dev = recv_topk_idx.device
    flat = recv_topk_idx.reshape(-1).to(torch.int64)
    key = torch.where(flat >= 0, flat, torch.full_like(flat, L))
    sorted_key, order = torch.sort(key, stable=True)
    first = torch.cumsum(counts, dim=0) - counts  # first sorted position of each expert
    zero = torch.zeros((1,), dtype=torch.int64, device=dev)
    first_ext = torch.cat([first, zero])
    start_ext = torch.cat([starts.to(torch.int64), zero])
    within = torch.arange(n * K, dtype=torch.int64, device=dev) - first_ext[sorted_key]
    slot_sorted = torch.where(sorted_key < L, start_ext[sorted_key] + within, torch.full_like(within, -1))
    slot = torch.empty_like(slot_sorted).scatter_(0, order, slot_sorted)
    return slot.view(n, K)


def slot_pairs(slot: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Inverse of :func:`expand_slots`: the flat pair ``row * K + k`` behind every expanded row.

    Args:
        slot: int64 ``[n, K]`` expanded rows (-1: none).
        num_slots: rows of the expanded layout (Ne).

    Returns:
        int64 ``[Ne]``: the pair of each row, -1 on alignment padding and unused rows.
    """
    flat = slot.reshape(-1)
    pairs = torch.arange(flat.numel(), dtype=torch.int64, device=slot.device)
    target = torch.where(flat >= 0, flat, torch.full_like(flat, num_slots))  # row num_slots collects the -1s
    inv = torch.full((num_slots + 1,), -1, dtype=torch.int64, device=slot.device)
    inv.scatter_(0, target, pairs)
    return inv[:num_slots]


def gather_rows(src: torch.Tensor, index: torch.Tensor, out_strides_col_major: bool = False) -> torch.Tensor:
    """``src[index]`` with rows where ``index < 0`` set to zero bytes (any dtype, fp8 included).

    Args:
        src: ``[n, C]`` rows to gather from.
        index: int64 ``[m]`` row of ``src`` per output row, -1 for a zero row.
        out_strides_col_major: return a column-major tensor whose column stride is ``m`` rounded up to 4
            (the layout V2's ``use_tma_aligned_col_major_sf`` gives scale factors).

    Returns:
        ``[m, C]`` of ``src.dtype``.
    """
    m, C = index.numel(), src.size(1)
    valid = index >= 0
    if src.size(0) == 0 or m == 0:
        out = torch.zeros((m, C), dtype=src.dtype, device=src.device)
    else:
        byte_view = src.element_size() == 1 and src.dtype != torch.uint8
        s = src.view(torch.uint8) if byte_view else src
        g = s.index_select(0, index.clamp(min=0))
        g = g.masked_fill(~valid.unsqueeze(1), 0)
        out = g.view(src.dtype) if byte_view else g
    if out_strides_col_major:
        return to_col_major(out)
    return out


def to_col_major(t: torch.Tensor) -> torch.Tensor:
    """A column-major copy of ``[m, C]`` whose column stride is ``m`` rounded up to 4 elements.

    Args:
        t: ``[m, C]`` tensor.

    Returns:
        The same values with strides ``(1, align_up(m, 4))``.
    """
    m, C = t.shape
    out = torch.empty_strided((m, C), (1, max(align_up(m, 4), 1)), dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out


def master_topk(recv_topk_idx: torch.Tensor) -> torch.Tensor:
    """First ``k`` of every received row that names a local expert (0 for rows with none).

    Args:
        recv_topk_idx: int64 ``[n, K]`` local ids (-1: none).

    Returns:
        int64 ``[n]``.
    """
    if recv_topk_idx.size(1) == 0:
        return torch.zeros((recv_topk_idx.size(0),), dtype=torch.int64, device=recv_topk_idx.device)
    return (recv_topk_idx >= 0).to(torch.int8).argmax(dim=1).to(torch.int64)


def _owners(topk_idx: torch.Tensor, num_local_experts: int) -> torch.Tensor:
    idx = topk_idx.to(torch.int64)
    return torch.where(idx >= 0, idx // num_local_experts, torch.full_like(idx, -1))


def sender_slots(
    is_token_in_rank: torch.Tensor, prefix_before: torch.Tensor, topk_idx: torch.Tensor, num_local_experts: int
) -> torch.Tensor:
    """V2's ``dst_buffer_slot_idx``: where each (token, k) lands in its expert rank's non-expanded rows.

    Args:
        is_token_in_rank: bool ``[T, R]`` (from ``get_dispatch_layout``).
        prefix_before: int64 ``[R]`` rows ranks before this one send to every rank (row ``rank - 1`` of
            ``rank_prefix_matrix``, zeros on rank 0).
        topk_idx: int64 ``[T, K]`` global expert ids (-1: none).
        num_local_experts: L.

    Returns:
        int32 ``[T, K]``, -1 where the id is -1.
    """
    pos = torch.cumsum(is_token_in_rank.to(torch.int64), dim=0) - 1 + prefix_before.unsqueeze(0)  # [T, R]
    owner = _owners(topk_idx, num_local_experts)
    if pos.size(1) == 0 or owner.numel() == 0:
        return torch.full(owner.shape, -1, dtype=torch.int32, device=owner.device)
    got = pos.gather(1, owner.clamp(min=0))
    return torch.where(owner >= 0, got, torch.full_like(got, -1)).to(torch.int32)


def home_row_positions(is_token_in_rank: torch.Tensor) -> torch.Tensor:
    """Where the row rank ``r`` returns for token ``t`` lands when rows come back home.

    Rows come back grouped by the rank returning them (ascending), each group in token order: the layout
    of a :class:`deep_ep.Buffer` dispatch whose sources are the expert ranks.

    Args:
        is_token_in_rank: bool ``[T, R]``.

    Returns:
        int64 ``[T, R]`` (meaningful where ``is_token_in_rank``).
    """
    m = is_token_in_rank.to(torch.int64)
    per_rank = m.sum(dim=0)
    offset = torch.cumsum(per_rank, dim=0) - per_rank
    return torch.cumsum(m, dim=0) - 1 + offset.unsqueeze(0)


def home_pair_positions(topk_idx: torch.Tensor) -> torch.Tensor:
    """Where the expanded row of pair (token ``t``, ``k``) lands when the expanded rows come back home.

    The expert ranks return their expanded rows in row order: by expert, then by token (then ``k``);
    blocks from lower ranks first. That is the order of the global expert id, then token, then ``k``.

    Args:
        topk_idx: int64 ``[T, K]`` global ids (-1: none).

    Returns:
        int64 ``[T, K]`` (meaningful where the id is not -1).
    """
    T, K = topk_idx.shape
    dev = topk_idx.device
    idx = topk_idx.to(torch.int64)
    t = torch.arange(T, dtype=torch.int64, device=dev).unsqueeze(1)
    k = torch.arange(K, dtype=torch.int64, device=dev).unsqueeze(0)
    key = (idx * max(T, 1) + t) * max(K, 1) + k
    big = torch.iinfo(torch.int64).max
    key = torch.where(idx >= 0, key, torch.full_like(key, big)).reshape(-1)
    order = torch.argsort(key, stable=True)
    pos = torch.empty_like(order).scatter_(0, order, torch.arange(T * K, dtype=torch.int64, device=dev))
    return pos.view(T, K)
