"""The torch twins of the Triton kernels: the same results from plain torch, on any device.

Every Triton kernel of :mod:`deep_ep.kernels` has a twin that the paths without the kernel (CPU,
``DEEP_EP_DISABLE_TRITON=1``) call, and that the kernel tests compare the kernel with (on CUDA, and
on the CPU under Triton's interpreter):

=======================================  ==================================================================
kernel (module: launcher)                twin
=======================================  ==================================================================
``layout``: ``dispatch_layout``          :func:`deep_ep.layout.dispatch_layout_torch`
``reduce``: ``reduce_rows``              :func:`deep_ep.rows.reduce_rows_torch`
``quant``: ``encode_*`` / ``decode_*``   each codec's ``encode_reference`` / ``decode_reference``
``plan``: ``device_plan``                :func:`device_plan_torch`
``plan``: ``localize_rows``              :func:`localize_rows_torch`
``scatter``: ``scatter_rows``            :func:`scatter_rows_torch`
``scatter``: ``copy_out``                :func:`copy_out_torch`
``scatter``: ``return_blocks``           :func:`return_blocks_torch`
``low_latency``: ``send``               :func:`ll_send_torch`
``low_latency``: ``recv``               :func:`ll_recv_torch`
``low_latency``: ``put_weights``        :func:`ll_put_weights_torch`
``low_latency``: ``combine_send``       :func:`ll_combine_send_torch`
``low_latency``: ``combine_reduce``     :func:`ll_reduce_torch`
=======================================  ==================================================================

Kernels that store into other ranks' memory reach a peer's region as this rank's region moved by a
distance in words; their twins take the regions of every rank as tensors instead (the same bytes).
The row-moving twins work on rows of integer words (as the transports view every row tensor), and
write only the rows the kernel writes, without a host sync: a masked row store is an
``index_put_`` that adds ``new - old`` (exact in integer arithmetic) at the row's slot, and 0 at a
harmless row where the mask is off.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..layout import DeviceLayout, device_layout

__all__ = [
    "scatter_rows_torch",
    "copy_out_torch",
    "return_blocks_torch",
    "device_plan_torch",
    "localize_rows_torch",
    "masked_row_store",
    "ll_send_torch",
    "ll_recv_torch",
    "ll_put_weights_torch",
    "ll_combine_send_torch",
    "ll_reduce_torch",
]


def masked_row_store(dst: torch.Tensor, index: torch.Tensor, ok: torch.Tensor, rows: torch.Tensor) -> None:
    """``dst[index[i]] = rows[i]`` where ``ok[i]``, nothing elsewhere; no host sync.

    Args:
        dst: integer ``[N, W]`` (rows of words).
        index: int64 ``[M]`` target rows (any value where ``ok`` is false; distinct where true).
        ok: bool ``[M]``.
        rows: ``[M, W]`` of ``dst.dtype``.
    """
    if dst.size(0) == 0 or index.numel() == 0:
        return
    if dst.is_floating_point():
        raise TypeError("masked_row_store works on integer words (view floating rows as ints)")
    at = torch.where(ok, index, torch.zeros_like(index)).clamp(0, dst.size(0) - 1)
    delta = rows - dst.index_select(0, at)
    delta = torch.where(ok.unsqueeze(1), delta, torch.zeros_like(delta))
    dst.index_put_((at,), delta, accumulate=True)


def _lists(*args):
    return ([a] if isinstance(a, torch.Tensor) else list(a) for a in args)


def scatter_rows_torch(src, slot: torch.Tensor, out, regions, rank: int) -> None:
    """Twin of :func:`deep_ep.kernels.scatter.scatter_rows`: ``src[t]`` to row ``slot[t, d]`` of each
    destination ``d`` (-1: not sent): ``out`` for ``d == rank`` (rows ``< out.size(0)``), else
    ``regions[d]`` (rows ``< regions[d].size(0)``).

    Args:
        src: integer ``[T, W]``, or a list of such tensors (the same tokens).
        slot: int64 ``[T, R]``.
        out: ``[N, W]`` (or a list, one per ``src``).
        regions: per ``src``, the list of every rank's region ``[cap, W]`` (one list for a single ``src``).
        rank: this rank.
    """
    if isinstance(src, torch.Tensor):
        srcs, outs, regs = [src], [out], [regions]
    else:
        srcs, outs, regs = list(src), list(out), list(regions)
    for s, o, rs in zip(srcs, outs, regs):
        if s.size(0) == 0 or s.size(1) == 0:
            continue
        for d in range(slot.size(1)):
            col = slot[:, d]
            dst = o if d == rank else rs[d]
            masked_row_store(dst, col, (col >= 0) & (col < dst.size(0)), s)


def copy_out_torch(src, dst, bounds: torch.Tensor) -> None:
    """Twin of :func:`deep_ep.kernels.scatter.copy_out`: ``dst[r] = src[r]`` for ``r < bounds[0]`` outside
    ``[bounds[1], bounds[2])``, ``dst[r] = 0`` for ``r >= bounds[0]``, other rows untouched.

    Args:
        src: ``[>= N, W]`` (or a list); dst: ``[N, W]`` (or a list); bounds: int64 ``[3]`` on the device.
    """
    srcs, dsts = _lists(src, dst)
    for s, d in zip(srcs, dsts):
        N = d.size(0)
        if N == 0 or d.size(1) == 0:
            continue
        r = torch.arange(N, device=d.device)
        n, lo, hi = bounds[0], bounds[1], bounds[2]
        take = (r < n) & ((r < lo) | (r >= hi))
        zero = r >= n
        keep = ~(take | zero)
        new = torch.where(take.unsqueeze(1), s[:N], torch.zeros((), dtype=d.dtype, device=d.device))
        d.copy_(torch.where(keep.unsqueeze(1), d, new))


def return_blocks_torch(src, table: torch.Tensor, regions, rank: int) -> None:
    """Twin of :func:`deep_ep.kernels.scatter.return_blocks`: for each ``d != rank``, rows
    ``table[d, 0] + i`` (``i < table[d, 1]``) of ``src`` to row ``table[d, 2] + i`` of ``regions[d]``
    (rows past its end are not written).

    Args:
        src: integer ``[N, W]`` (or a list); table: int64 ``[R, 3]``; regions: every rank's region (per
            ``src``, as in :func:`scatter_rows_torch`); rank: this rank.
    """
    if isinstance(src, torch.Tensor):
        srcs, regs = [src], [regions]
    else:
        srcs, regs = list(src), list(regions)
    for s, rs in zip(srcs, regs):
        N = s.size(0)
        if N == 0 or s.size(1) == 0:
            continue
        i = torch.arange(N, device=s.device)
        for d in range(table.size(0)):
            if d == rank:
                continue
            first, cnt, at = table[d, 0], table[d, 1], table[d, 2]
            cap = rs[d].size(0)
            rows = s.index_select(0, (first + i).clamp(0, N - 1))
            masked_row_store(rs[d], at + i, (i < cnt) & (at + i < cap), rows)


def device_plan_torch(
    is_token_in_rank: torch.Tensor,
    meta: torch.Tensor,
    rank: int,
    header: int,
    fields: Sequence[int],
    h_err: int,
    h_worst: int,
    h_e: int,
) -> Tuple[DeviceLayout, torch.Tensor, torch.Tensor]:
    """Twin of :func:`deep_ep.kernels.plan.device_plan`: ``(layout, rank_prefix_matrix int32 [R, R],
    verdict int64 [3])`` from the mask ``[T, R]`` and every rank's metadata ``meta`` ``[R, n]`` (header,
    counts ``[R]`` at ``header``, then the least and greatest expert id).

    The verdict: (ranks disagree on a header column in ``fields`` or one set ``h_err``; a rank receives
    more rows than its ``h_worst`` (when > 0); a rank's ids lie outside ``[-1, E)``, ``E`` its header
    column ``h_e`` when positive).
    """
    R = meta.size(0)
    counts = meta[:, header : header + R].to(torch.int64)
    hdr = meta[:, :header]
    sel = hdr[:, list(fields)]
    mismatch = (sel != sel[rank]).any() | (hdr[:, h_err] != 0).any()
    worst = hdr[:, h_worst]
    over = ((worst > 0) & (counts.sum(dim=0) > worst)).any()
    e, lo, hi = hdr[:, h_e], meta[:, header + R], meta[:, header + R + 1]
    bad = ((e > 0) & ((lo < -1) | (hi >= e))).any()
    verdict = torch.stack([mismatch, over, bad]).to(torch.int64)
    rpm = torch.cumsum(counts, dim=0).to(torch.int32)
    return device_layout(is_token_in_rank, counts, rank), rpm, verdict


def localize_rows_torch(
    topk_idx: torch.Tensor,
    topk_weights: Optional[torch.Tensor],
    num_valid: torch.Tensor,
    rank: int,
    num_local: int,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Twin of :func:`deep_ep.kernels.plan.localize_rows`: global expert ids -> this rank's local ids
    (others -1, their weights 0), and rows at or past ``num_valid`` (int64 ``[1]`` on the device) -1 / 0.

    Returns:
        ``(int64 [N, K], float32 [N, K] or None)``, new tensors.
    """
    lo = rank * num_local
    N = topk_idx.size(0)
    valid = (torch.arange(N, device=topk_idx.device) < num_valid.reshape(-1)[:1]).unsqueeze(1)
    keep = valid & (topk_idx >= lo) & (topk_idx < lo + num_local)
    idx = torch.where(keep, topk_idx - lo, torch.full_like(topk_idx, -1))
    w = None
    if topk_weights is not None:
        w = torch.where(keep, topk_weights, torch.zeros((), dtype=topk_weights.dtype, device=topk_weights.device))
    return idx, w


# ---------------------------------------------------------------------------------------------- low latency
# The twins of deep_ep.kernels.low_latency. ``arenas[r]`` is rank r's whole arena (uint8), ``area`` the byte
# offset of the call's area in every arena, ``lay`` its layout (deep_ep.transport.nvlink.low_latency.area_layout).


def _area_i32(arena: torch.Tensor, area: int, first: int, n: int) -> torch.Tensor:
    """``n`` int32 words of ``arena`` from byte ``area + first``."""
    return arena[area + first : area + first + 4 * n].view(torch.int32)


def ll_send_torch(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    arenas: Sequence[torch.Tensor],
    rank: int,
    area: int,
    lay: dict,
    err: torch.Tensor,
    round_scale: bool,
    use_ue8m0: bool,
) -> None:
    """Twin of :func:`deep_ep.kernels.low_latency.send`: this rank's tokens into every rank's area.

    For each token ``t`` and valid, first-named expert ``e`` of it (ids outside ``[-1, E)`` are skipped and
    set bit 2 of ``err``, a repeat within a token bit 1): the pair ``t * K + k`` into the info block
    ``[e - d L, rank, position]`` of ``e``'s rank ``d`` (position: how many earlier tokens name ``e``;
    ``< M``), the token's row once into data row ``rank * M + t`` of every such rank (fp8 values then the
    scales, or bf16), and every expert's token count into its rank's count table at ``[rank, e - d L]``.
    """
    T, H = x.shape
    K = topk_idx.size(1)
    R, E, L, M = len(arenas), lay["E"], lay["L"], lay["M"]
    dev = x.device
    ids = topk_idx.to(torch.int64)
    bad = (ids < -1) | (ids >= E)
    e = torch.where(bad, torch.full_like(ids, -1), ids)
    kk = torch.arange(K, device=dev)
    earlier = kk.view(1, K) < kk.view(K, 1)  # [k, k']: k' < k
    same = (e.unsqueeze(2) == e.unsqueeze(1)) & earlier.unsqueeze(0) & (e.unsqueeze(2) >= 0)
    dup = same.any(dim=2)
    flags = 2 * int(bad.any()) + int(dup.any())
    if flags:
        err.copy_(err | flags)
    ok = (e >= 0) & ~dup
    # position of token t among this rank's tokens naming e (a token counted once however often it names e)
    names = torch.zeros((T, E + 1), dtype=torch.int64, device=dev)
    names.scatter_(1, torch.where((ids >= 0) & (ids < E), ids, torch.full_like(ids, E)), 1)
    names = names[:, :E]
    before = torch.cumsum(names, dim=0) - names  # [T, E]: earlier tokens naming e
    pos = before.gather(1, e.clamp(min=0))
    ok = ok & (pos < M)
    dst = torch.where(ok, e, torch.zeros_like(e)) // L
    firstd = ok & ~((dst.unsqueeze(2) == dst.unsqueeze(1)) & earlier.unsqueeze(0) & ok.unsqueeze(1)).any(dim=2)
    if lay["fp8"]:
        from ..codecs import make_codec

        codec = make_codec(8, H, round_scale=bool(round_scale or use_ue8m0), use_ue8m0=bool(use_ue8m0))
        packed = codec.encode_reference(x.float()) if T else torch.empty((0, codec.row_bytes), dtype=torch.uint8)
        sb = codec.scale_bytes
        row = torch.cat([packed[:, sb:], packed[:, :sb]], dim=1)  # values first, then the scales
    else:
        row = x.to(torch.bfloat16).contiguous().view(torch.uint8)
    for d in range(R):
        a = arenas[d]
        mine = ok & (dst == d)
        # info entries: pair t * K + k at [e - d L, rank, pos]
        tk, kk2 = mine.nonzero(as_tuple=True)
        if tk.numel():
            le = e[tk, kk2] - d * L
            info = _area_i32(a, area, lay["info"], L * R * M)
            info[(le * R + rank) * M + pos[tk, kk2]] = (tk * K + kk2).to(torch.int32)
        # the data row of every token with an expert on d, once
        toks = (firstd & (dst == d)).any(dim=1).nonzero(as_tuple=True)[0]
        if toks.numel():
            base = area + lay["data"]
            rowb = lay["rowb"]
            for t in toks.tolist():
                at = base + (rank * M + t) * rowb
                a[at : at + row.size(1)] = row[t]
        # every expert of d: tokens naming it
        cnt = _area_i32(a, area, lay["cnt"], R * L).view(R, L)
        cnt[rank] = names[:, d * L : (d + 1) * L].sum(dim=0).to(torch.int32)


def ll_recv_torch(
    arena: torch.Tensor,
    area: int,
    lay: dict,
    num_ranks: int,
    main: torch.Tensor,
    tail: Optional[torch.Tensor],
    count: torch.Tensor,
    src: torch.Tensor,
    inv: torch.Tensor,
) -> None:
    """Twin of :func:`deep_ep.kernels.low_latency.recv`: the received rows packed per local expert (source
    rank ascending, then position), into ``main`` (int32 words ``[L * R * M, MW]``) and ``tail`` (the
    scales' words), ``count`` ``[L]``, ``src`` (``s * M * K + t * K + k`` of each row) and ``inv`` (the row
    of each received (source, token, k))."""
    R, L, M, K = num_ranks, lay["L"], lay["M"], lay["K"]
    cnt = _area_i32(arena, area, lay["cnt"], R * L).view(R, L).to(torch.int64)
    info = _area_i32(arena, area, lay["info"], L * R * M).view(L, R, M).to(torch.int64)
    tot = cnt.sum(dim=0)
    count.copy_(tot.to(count.dtype))
    MW = main.size(1)
    SW = tail.size(1) if tail is not None else 0
    rowq = lay["rowb"] // 4
    data = arena[area + lay["data"] : area + lay["data"] + R * M * lay["rowb"]].view(torch.int32).view(R * M, rowq)
    for l in range(L):
        j = 0
        for s in range(R):
            n = int(cnt[s, l])
            if not n:
                continue
            pair = info[l, s, :n]
            rows = l * R * M + j + torch.arange(n, device=main.device)
            src[rows] = (s * M * K + pair).to(src.dtype)
            inv[s * M * K + pair] = rows.to(inv.dtype)
            words = data[s * M + pair // K]
            main[rows] = words[:, :MW]
            if tail is not None:
                tail[rows] = words[:, MW : MW + SW]
            j += n


def ll_put_weights_torch(
    topk_weights: torch.Tensor, arenas: Sequence[torch.Tensor], rank: int, area: int, lay: dict
) -> None:
    """Twin of :func:`deep_ep.kernels.low_latency.put_weights`: this rank's combine weights (float32
    ``[T, K]``) into slot ``rank`` of every rank's weight table (``[R, M, K]`` float32)."""
    w = topk_weights.to(torch.float32).reshape(-1)
    MK = lay["M"] * lay["K"]
    for a in arenas:
        table = a[area + lay["wts"] : area + lay["wts"] + 4 * len(arenas) * MK].view(torch.float32)
        table[rank * MK : rank * MK + w.numel()] = w


def ll_combine_send_torch(
    y: torch.Tensor, inv: torch.Tensor, arenas: Sequence[torch.Tensor], rank: int, area: int, lay: dict
) -> None:
    """Twin of :func:`deep_ep.kernels.low_latency.combine_send`: per (source ``s``, token ``t``) with an
    expert here, ``sum_k w[s, t, k] * y[row of (s, t, k)]`` (float32, the weights from this rank's table),
    one bf16 row into ``s``'s partial rows at ``t * R + rank``."""
    R, M, K, H = len(arenas), lay["M"], lay["K"], lay["H"]
    me = arenas[rank]
    w = me[area + lay["wts"] : area + lay["wts"] + 4 * R * M * K].view(torch.float32).view(R * M, K)
    rows = inv.view(R * M, K).to(torch.int64)
    yy = y.reshape(-1, H)
    got = rows >= 0
    vals = yy.index_select(0, rows.clamp(min=0).reshape(-1)).view(R * M, K, H).float()
    wk = torch.where(got, w, torch.zeros((), dtype=torch.float32, device=w.device))
    acc = torch.zeros((R * M, H), dtype=torch.float32, device=y.device)
    for k in range(K):  # in k order, as the kernel adds them
        acc = acc + wk[:, k : k + 1] * torch.where(got[:, k : k + 1], vals[:, k], torch.zeros((), device=y.device))
    here = got.any(dim=1)
    part = acc.to(torch.bfloat16)
    for s in range(R):
        sel = here[s * M : (s + 1) * M].nonzero(as_tuple=True)[0]
        if not sel.numel():
            continue
        dst = arenas[s][area + lay["part"] : area + lay["part"] + 2 * M * R * H].view(torch.bfloat16).view(M, R, H)
        dst[sel, rank] = part[s * M + sel]


def ll_reduce_torch(
    arena: torch.Tensor, area: int, lay: dict, num_ranks: int, topk_idx: torch.Tensor, out: torch.Tensor
) -> None:
    """Twin of :func:`deep_ep.kernels.low_latency.combine_reduce`: ``out[t]`` = the float32 sum of the
    partial rows of the ranks token ``t``'s valid entries name, in rank order, cast to ``out.dtype``."""
    T, K = topk_idx.shape
    R, L, M, H = num_ranks, lay["L"], lay["M"], lay["H"]
    part = arena[area + lay["part"] : area + lay["part"] + 2 * M * R * H].view(torch.bfloat16).view(M, R, H)
    e = topk_idx.to(torch.int64)
    r = torch.arange(R, device=out.device)
    went = ((e.unsqueeze(1) >= 0) & (torch.div(e, L, rounding_mode="floor").unsqueeze(1) == r.view(1, R, 1))).any(
        dim=2
    )  # [T, R]
    acc = torch.zeros((T, H), dtype=torch.float32, device=out.device)
    for rr in range(R):
        acc = acc + torch.where(went[:, rr : rr + 1], part[:T, rr].float(), torch.zeros((), device=out.device))
    out.copy_(acc.to(out.dtype))
