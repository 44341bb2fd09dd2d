"""Triton twin of the device plan of a ``num_worst_tokens`` dispatch (:func:`deep_ep.plans.build_device_plan`).

One launch computes, from the token-to-rank mask and every rank's published metadata, what the torch
path computes with ~25 small ops (:func:`deep_ep.layout.device_layout`, ``rank_prefix_matrix`` and the
deferred checks' verdict): program ``d`` scans column ``d`` of the mask (a running count over blocks
of tokens) and writes the slot, send position and combine position of each token for rank ``d``;
program 0 also writes ``recv``, ``ret``, ``rank_prefix_matrix`` and the verdict. Same integers as the
torch path (tested equal); the host time of a device-path dispatch is what it saves.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..layout import DeviceLayout


@triton.jit
def verdict(
    meta_ptr,
    stride,
    C,
    RANK: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    HDR: tl.constexpr,
    HP: tl.constexpr,
    FIELDS: tl.constexpr,
    H_ERR: tl.constexpr,
    H_WORST: tl.constexpr,
    H_E: tl.constexpr,
):
    """Every rank's metadata row (``meta_ptr + r * stride``: the header, the counts at ``HDR ..``, the least and
    greatest expert id after them) judged alike on every rank: ``(mismatch, over, bad)``: ranks disagree on a
    header field of ``FIELDS`` (bit ``f``: column ``f``) or one rejected its input (``H_ERR``); a rank receives
    more rows (``C`` ``[RP, RP]``, ``C[s][d]`` rows ``s`` sends ``d``) than its ``num_worst_tokens``
    (``H_WORST``); a rank's ids lie outside ``[-1, E)`` (``H_E``, where top-k was given). Shared by the
    device plan and the fused notify; the host path's twin is :func:`deep_ep.agreement.check_rows`,
    :func:`deep_ep.agreement.check_id_ranges` and :func:`deep_ep.plans.check_worst`."""
    rr = tl.arange(0, RP)
    rin = rr < R
    ff = tl.arange(0, HP)
    fm = (ff < HDR) & (((FIELDS >> ff) & 1) == 1)
    fmask = rin[:, None] & fm[None, :]
    sel = tl.load(meta_ptr + rr[:, None] * stride + ff[None, :], mask=fmask, other=0)
    mine = tl.load(meta_ptr + RANK * stride + ff, mask=fm, other=0)
    diff = tl.sum(tl.where(fmask & (sel != mine[None, :]), 1, 0), axis=1)
    err = tl.load(meta_ptr + rr * stride + H_ERR, mask=rin, other=0)
    mismatch = tl.sum(tl.where(rin & ((diff > 0) | (err != 0)), 1, 0), axis=0) > 0
    worst = tl.load(meta_ptr + rr * stride + H_WORST, mask=rin, other=0)
    received = tl.sum(C, axis=0)
    over = tl.sum(tl.where(rin & (worst > 0) & (received > worst), 1, 0), axis=0) > 0
    e = tl.load(meta_ptr + rr * stride + H_E, mask=rin, other=0)
    lo = tl.load(meta_ptr + rr * stride + HDR + R, mask=rin, other=0)
    hi = tl.load(meta_ptr + rr * stride + HDR + R + 1, mask=rin, other=0)
    bad = tl.sum(tl.where(rin & (e > 0) & ((lo < -1) | (hi >= e)), 1, 0), axis=0) > 0
    return mismatch, over, bad


@triton.jit
def _plan_kernel(
    mask_ptr,
    meta_ptr,
    slot_ptr,
    send_ptr,
    comb_ptr,
    recv_ptr,
    ret_ptr,
    rpm_ptr,
    verdict_ptr,
    T,
    n_meta,
    RANK: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    HDR: tl.constexpr,
    HP: tl.constexpr,
    FIELDS: tl.constexpr,
    H_ERR: tl.constexpr,
    H_WORST: tl.constexpr,
    H_E: tl.constexpr,
    BLOCK: tl.constexpr,
):
    d = tl.program_id(0)
    rr = tl.arange(0, RP)
    rin = rr < R
    col_d = tl.load(meta_ptr + rr * n_meta + HDR + d, mask=rin, other=0)  # counts[:, d]
    row_me = tl.load(meta_ptr + RANK * n_meta + HDR + rr, mask=rin, other=0)  # counts[RANK, :]
    bsrc = tl.sum(tl.where(rr < RANK, col_d, 0), axis=0)  # rows ranks < RANK send to d
    bdst = tl.sum(tl.where(rr < d, row_me, 0), axis=0)  # rows RANK sends to ranks < d
    running = tl.zeros([1], dtype=tl.int64)
    for t0 in range(0, T, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        tm = t < T
        m = tl.load(mask_ptr + t.to(tl.int64) * R + d, mask=tm, other=0).to(tl.int64)
        inc = tl.cumsum(m, axis=0) + running
        running += tl.sum(m, axis=0)
        s = tl.where(m > 0, inc - 1 + bsrc, -1)
        p = tl.where(m > 0, inc - 1 + bdst, -1)
        at = t.to(tl.int64) * R + d
        tl.store(slot_ptr + at, s, mask=tm)
        tl.store(send_ptr + at, p, mask=tm)
        tl.store(comb_ptr + at, tl.where(d == RANK, s, p), mask=tm)
    if d == 0:
        cc = tl.arange(0, RP)
        full = rin[:, None] & (cc < R)[None, :]
        cnt = tl.load(meta_ptr + rr[:, None] * n_meta + HDR + cc[None, :], mask=full, other=0)  # counts[s][d']
        incl = tl.cumsum(cnt, axis=0)  # over sources
        tl.store(rpm_ptr + rr[:, None] * R + cc[None, :], incl.to(tl.int32), mask=full)
        col_me = tl.sum(tl.where(cc[None, :] == RANK, cnt, 0), axis=1)  # counts[s][RANK]
        before_src_me = tl.cumsum(col_me, axis=0) - col_me  # rows ranks < s send to RANK
        before_dst_me = tl.sum(tl.where(cc[None, :] < RANK, cnt, 0), axis=1)  # rows s sends to ranks < RANK
        total = tl.sum(col_me, axis=0)
        own_lo = tl.sum(tl.where(rr < RANK, col_me, 0), axis=0)
        own_n = tl.sum(tl.where(rr == RANK, col_me, 0), axis=0)
        tl.store(recv_ptr + 0, total)
        tl.store(recv_ptr + 1, own_lo)
        tl.store(recv_ptr + 2, own_lo + own_n)
        tl.store(ret_ptr + rr * 3 + 0, before_src_me, mask=rin)
        tl.store(ret_ptr + rr * 3 + 1, col_me, mask=rin)
        tl.store(ret_ptr + rr * 3 + 2, before_dst_me, mask=rin)
        mismatch, over, bad = verdict(meta_ptr, n_meta, cnt, RANK, R, RP, HDR, HP, FIELDS, H_ERR, H_WORST, H_E)
        tl.store(verdict_ptr + 0, mismatch.to(tl.int64))
        tl.store(verdict_ptr + 1, over.to(tl.int64))
        tl.store(verdict_ptr + 2, bad.to(tl.int64))


def device_plan(
    is_token_in_rank: torch.Tensor,
    meta: torch.Tensor,
    rank: int,
    header: int,
    fields: Sequence[int],
    h_err: int,
    h_worst: int,
    h_e: int,
) -> Tuple[DeviceLayout, torch.Tensor, torch.Tensor]:
    """``(layout, rank_prefix_matrix int32 [R, R], verdict int64 [3])`` of a device plan: ``layout`` as
    :func:`deep_ep.layout.device_layout` returns it, from the mask ``[T, R]`` and the metadata ``meta``
    ``[R, n]`` (int64; counts at columns ``header .. header + R``, then each rank's least and greatest
    expert id); ``verdict`` = (ranks disagree on a header field in ``fields`` or one set ``h_err``, a
    rank receives more than its ``h_worst``, a rank's ids lie outside ``[-1, E)`` with ``E`` its header
    column ``h_e`` when positive)."""
    T, R = is_token_in_rank.shape
    dev = is_token_in_rank.device
    if any(not 0 <= f < header for f in fields) or header > 62:
        raise ValueError(f"header fields {fields} must lie in [0, {header}) with a header of at most 62 columns")
    bits = sum(1 << f for f in set(fields))  # a compile-time constant: nothing to copy to the device
    mask = is_token_in_rank.contiguous().view(torch.uint8)
    meta = meta.contiguous()
    slot = torch.empty((T, R), dtype=torch.int64, device=dev)
    send = torch.empty((T, R), dtype=torch.int64, device=dev)
    comb = torch.empty((T, R), dtype=torch.int64, device=dev)
    small = torch.empty((3 + 3 * R + 3,), dtype=torch.int64, device=dev)  # recv | ret | verdict
    recv, ret, verdict = small[:3], small[3 : 3 + 3 * R].view(R, 3), small[3 + 3 * R :]
    rpm = torch.empty((R, R), dtype=torch.int32, device=dev)
    _plan_kernel[(R,)](
        mask,
        meta,
        slot,
        send,
        comb,
        recv,
        ret,
        rpm,
        verdict,
        T,
        meta.size(1),
        RANK=rank,
        R=R,
        RP=max(triton.next_power_of_2(R), 2),
        HDR=header,
        HP=max(triton.next_power_of_2(header), 2),
        FIELDS=bits,
        H_ERR=h_err,
        H_WORST=h_worst,
        H_E=h_e,
        BLOCK=1024,
        num_warps=4,
    )
    return DeviceLayout(slot=slot, send_pos=send, recv=recv, ret=ret, combine_pos=comb), rpm, verdict


@triton.jit
def _localize_kernel(
    idx_ptr, w_ptr, n_ptr, out_idx_ptr, out_w_ptr, total, K, lo, L, HAS_W: tl.constexpr, BLOCK: tl.constexpr
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < total
    n = tl.load(n_ptr)
    e = tl.load(idx_ptr + i, mask=m, other=-1)
    keep = (i // K < n) & (e >= lo) & (e < lo + L)
    tl.store(out_idx_ptr + i, tl.where(keep, e - lo, -1), mask=m)
    if HAS_W:
        w = tl.load(w_ptr + i, mask=m, other=0.0)
        tl.store(out_w_ptr + i, tl.where(keep, w, 0.0), mask=m)


def localize_rows(topk_idx: torch.Tensor, topk_weights, num_valid: torch.Tensor, rank: int, num_local: int):
    """:func:`deep_ep.layout.localize_topk` and the masking of rows at or past ``num_valid`` (int64 on the
    device: the received count of a device-path dispatch) in one launch: ``(local ids, weights or None)``."""
    N, K = topk_idx.shape
    idx = topk_idx.contiguous()
    out_idx = torch.empty_like(idx)
    w = topk_weights.contiguous() if topk_weights is not None else None
    out_w = torch.empty_like(w) if w is not None else None
    total = N * K
    if total:
        block = 1024
        _localize_kernel[(triton.cdiv(total, block),)](
            idx,
            w if w is not None else idx,
            num_valid,
            out_idx,
            out_w if out_w is not None else out_idx,
            total,
            K,
            rank * num_local,
            num_local,
            HAS_W=w is not None,
            BLOCK=block,
            num_warps=4,
        )
    return out_idx, out_w
