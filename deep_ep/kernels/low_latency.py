"""Triton kernels of the nvlink low-latency path (:mod:`deep_ep.transport.nvlink.low_latency`).

Each call is a send kernel, one device barrier, and a receive kernel; the
staging is the arena's area of the call (see that module for its layout).
Another rank's area is this rank's own, moved by the distance between the
two ranks' arenas in this process's address space (``dbytes`` / ``dwords``,
int64 per rank, multiples of 64 bytes).

- :func:`send`: per token, the fp8 cast (DeepEP's per-128 scales, the
  codec's bytes, :func:`deep_ep.kernels.quant.fp8_blocks`) or the bf16 row,
  stored once per destination *rank* (however many of its experts are
  there) into that rank's data row ``(this rank, t)``; per selected expert,
  the pair's ``t * K + k`` into the destination's info block ``[local
  expert, this rank, position]`` (position = the token's rank among this
  rank's tokens of that expert, so the order is the token order); and every
  expert's token count into the destination's count table. DeepEP sends one
  message per (token, expert); with top-8 of 288 experts on 2 ranks a token
  has ~4 experts per rank, so ~4x fewer bytes cross the link. An expert id out of range or repeated in a
  token is skipped and flagged in ``err`` (bit 2 / bit 1).
- :func:`recv`: the received blocks packed per local expert (source rank
  ascending), each row gathered from the data row of its (source, token)
  into the caller's ``[L, R * M, H]`` tensors, the
  source of each row (``src * M * K + t * K + k``) and ``recv_count``.
- :func:`put_weights`: this rank's combine weights into every rank's table.
- :func:`combine_send`: per (source, token) with experts here, the sum over
  them of the source's weight times the expert's row (float32), one bf16
  row into the source's area at row ``t * R + rank``; the rows of a token are
  found through ``inv``, the row of each received (source, token, k), and
  the programs walk (block of tokens, chunk of columns) units.
- :func:`combine_reduce`: ``out[t]`` = the sum (float32) of the partial rows
  of the ranks its valid entries name.

Grids are wide, many programs per SM, so memory latency overlaps: send has
one program per (token, chunk of its row) plus the count programs, reduce
one per (token, chunk); the receive and combine-send programs walk only the
non-empty blocks of ``JB`` rows of all experts (grid-stride), so a skewed
routing (every token to one expert) still uses every program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Launcher
from .quant import fp8_blocks


@triton.jit
def _ll_send(
    x_ptr,
    idx_ptr,
    a8,
    a32,
    dbytes,
    dwords,
    err_ptr,
    T,
    H,
    E,
    L,
    M,
    K,
    NCH,
    CNT_W,
    INFO_W,
    DATA_B,
    DATA_W,
    ROWB,
    ROWW,
    R: tl.constexpr,
    ME: tl.constexpr,
    KP: tl.constexpr,
    TB: tl.constexpr,
    EPP: tl.constexpr,
    FP8: tl.constexpr,
    ROUND: tl.constexpr,
    UE8M0: tl.constexpr,
    BB: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # programs [0, T * NCH): one chunk of one token's row each; the rest: EPP experts' counts each
    pid = tl.program_id(0)
    ks = tl.arange(0, KP)
    kin = ks < K
    tb = tl.arange(0, TB)
    if pid < T * NCH:
        t = pid // NCH
        ch = pid - t * NCH
        e64 = tl.load(idx_ptr + t * K + ks, mask=kin, other=-1)
        bad = kin & ((e64 < -1) | (e64 >= E))  # (checked before narrowing to int32)
        e = tl.where(bad, -1, e64).to(tl.int32)
        same = (e[:, None] == e[None, :]) & (ks[None, :] < ks[:, None]) & (e[:, None] >= 0)
        dup = tl.max(same.to(tl.int32), axis=1)
        ok = (e >= 0) & (dup == 0)
        # the token's position among this rank's tokens of each of its experts
        pos = tl.zeros([KP], dtype=tl.int32)
        for t0 in range(0, t, TB):
            rows = t0 + tb
            blk = tl.load(
                idx_ptr + rows[:, None] * K + ks[None, :], mask=(rows < t)[:, None] & kin[None, :], other=-1
            ).to(tl.int32)
            hit = tl.max((blk[None, :, :] == e[:, None, None]).to(tl.int32), axis=2)  # [KP, TB]
            pos += tl.sum(hit, axis=1)
        ok = ok & (pos < M)
        es = tl.where(ok, e, 0)
        dst = es // L
        srow = ((es - dst * L) * R + ME).to(tl.int64) * M + pos
        # the row crosses once per destination rank (its first valid entry there), into data row (ME, t)
        samed = (dst[:, None] == dst[None, :]) & (ks[None, :] < ks[:, None]) & ok[None, :]
        first = ok & (tl.max(samed.to(tl.int32), axis=1) == 0)
        drow = ME * M + t
        dw = tl.multiple_of(tl.load(dwords + dst, mask=ok, other=0), 16)  # (distances: multiples of 64 bytes)
        if ch == 0:
            flags = 2 * tl.max(bad.to(tl.int32), axis=0) + tl.max(dup, axis=0)
            if flags != 0:
                tl.atomic_or(err_ptr, flags)
            tl.store(a32 + dw + INFO_W + srow, t * K + ks, mask=ok)
        if FP8:
            db = tl.multiple_of(tl.load(dbytes + dst, mask=ok, other=0), 64)
            rowb = db + DATA_B + drow.to(tl.int64) * ROWB  # [KP]
            NB = H // 128
            blk = ch * BB + tl.arange(0, BB)
            bm = blk < NB
            col = blk[:, None] * 128 + tl.arange(0, 128)[None, :]
            xv = tl.load(x_ptr + t * H + col, mask=bm[:, None], other=0.0).to(tl.float32)
            qb, scale = fp8_blocks(xv, ROUND)
            m3 = first[:, None, None] & bm[None, :, None]
            tl.store(
                a8 + rowb[:, None, None] + col[None, :, :], tl.broadcast_to(qb[None, :, :], (KP, BB, 128)), mask=m3
            )
            sm = first[:, None] & bm[None, :]
            bits = scale.to(tl.int32, bitcast=True)
            if UE8M0:
                tl.store(
                    a8 + rowb[:, None] + H + blk[None, :],
                    tl.broadcast_to(((bits >> 23) & 0xFF).to(tl.uint8)[None, :], (KP, BB)),
                    mask=sm,
                )
            else:
                roww = dw + DATA_W + drow.to(tl.int64) * ROWW + H // 4
                tl.store(a32 + roww[:, None] + blk[None, :], tl.broadcast_to(bits[None, :], (KP, BB)), mask=sm)
        else:
            HW = H // 2
            roww = dw + DATA_W + drow.to(tl.int64) * ROWW
            offs = ch * BLOCK + tl.arange(0, BLOCK)
            cm = offs < HW
            v = tl.load(x_ptr.to(tl.pointer_type(tl.int32)) + t * HW + offs, mask=cm)
            tl.store(
                a32 + roww[:, None] + offs[None, :],
                tl.broadcast_to(v[None, :], (KP, BLOCK)),
                mask=first[:, None] & cm[None, :],
            )
    else:
        # EPP experts' token counts (tokens naming the expert; a repeat counts once) into their ranks' tables
        ce = (pid - T * NCH) * EPP + tl.arange(0, EPP)  # (names differ from the branch above: shapes)
        cnt = tl.zeros([EPP], dtype=tl.int32)
        for c0 in range(0, T, TB):
            crows = c0 + tb
            cblk = tl.load(
                idx_ptr + crows[:, None] * K + ks[None, :], mask=(crows < T)[:, None] & kin[None, :], other=-1
            )
            cnt += tl.sum(tl.max((cblk[None, :, :] == ce[:, None, None]).to(tl.int32), axis=2), axis=1)
        cin = ce < E
        cdst = tl.where(cin, ce, 0) // L
        tl.store(a32 + tl.load(dwords + cdst, mask=cin, other=0) + CNT_W + ME * L + (ce - cdst * L), cnt, mask=cin)


@triton.jit
def _item(item, cum, nb, tot, ls):
    """The expert of work item ``item`` and the first row of its block, from per-expert block counts."""
    l = tl.sum((cum <= item).to(tl.int32), axis=0)
    start = tl.sum(tl.where(ls == l, cum - nb, 0), axis=0)
    total = tl.sum(tl.where(ls == l, tot, 0), axis=0)
    return l, item - start, total


@triton.jit
def _ll_recv(
    a32,
    CNT_W,
    INFO_W,
    DATA_W,
    ROWQ,
    main_ptr,
    tail_ptr,
    count_ptr,
    src_ptr,
    inv_ptr,
    L,
    M,
    MK,
    MW,
    SW,
    R: tl.constexpr,
    RP: tl.constexpr,
    LP: tl.constexpr,
    JB: tl.constexpr,
    BLOCK: tl.constexpr,
    TBLOCK: tl.constexpr,
    HAS_TAIL: tl.constexpr,
):
    pid = tl.program_id(0)
    NPROG = tl.num_programs(0)
    ls = tl.arange(0, LP)
    rs = tl.arange(0, RP)
    lin = ls < L
    table = tl.load(a32 + CNT_W + rs[:, None] * L + ls[None, :], mask=(rs < R)[:, None] & lin[None, :], other=0)
    tot = tl.sum(table, axis=0)  # [LP]
    if pid == 0:
        tl.store(count_ptr + ls, tot, mask=lin)
    nb = (tot + JB - 1) // JB
    cum = tl.cumsum(nb, axis=0)
    n_items = tl.sum(nb, axis=0)
    RM = R * M
    cols = tl.arange(0, BLOCK)
    for item in range(pid, n_items, NPROG):
        l, b, total = _item(item, cum, nb, tot, ls)
        c = tl.load(a32 + CNT_W + rs * L + l, mask=rs < R, other=0)
        incl = tl.cumsum(c, axis=0)
        js = b * JB + tl.arange(0, JB)
        jv = js < total
        src = tl.sum((js[:, None] >= incl[None, :]).to(tl.int32), axis=1)
        base = tl.sum(tl.where(src[:, None] == rs[None, :], (incl - c)[None, :], 0), axis=1)
        srow = (l * R + src).to(tl.int64) * M + (js - base)
        info = tl.load(a32 + INFO_W + srow, mask=jv, other=0)
        orow = (l * RM + js).to(tl.int64)
        tl.store(src_ptr + orow, src * MK + info, mask=jv)
        tl.store(inv_ptr + src * MK + info, orow.to(tl.int32), mask=jv)  # (src, t, k) -> its row
        drow = src.to(tl.int64) * M + info // (MK // M)  # the token's row from its source: (src, t)
        sw = DATA_W + drow * ROWQ * 4  # (rows are 16-byte multiples: ROWQ * 4 words, vector loads)
        for c0 in range(0, MW, BLOCK):
            offs = c0 + cols
            m = jv[:, None] & (offs < MW)[None, :]
            tl.store(
                main_ptr + orow[:, None] * MW + offs[None, :],
                tl.load(a32 + sw[:, None] + offs[None, :], mask=m),
                mask=m,
            )
        if HAS_TAIL:
            tcols = tl.arange(0, TBLOCK)
            for c0 in range(0, SW, TBLOCK):
                offs = c0 + tcols
                m = jv[:, None] & (offs < SW)[None, :]
                tl.store(
                    tail_ptr + orow[:, None] * SW + offs[None, :],
                    tl.load(a32 + sw[:, None] + MW + offs[None, :], mask=m),
                    mask=m,
                )


@triton.jit
def _ll_put_weights(w_ptr, a32, dwords, WTS_W, N, MK, R: tl.constexpr, ME: tl.constexpr, BLOCK: tl.constexpr):
    # this rank's combine weights (float32 bits, [T * K]) into slot ME of every rank's weight table
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < N
    v = tl.load(w_ptr + i, mask=m)
    for d in tl.static_range(R):
        tl.store(a32 + tl.multiple_of(tl.load(dwords + d), 16) + WTS_W + ME * MK + i, v, mask=m)


@triton.jit
def _ll_combine_send(
    y_ptr,
    inv_ptr,
    a32,
    a16,
    dwords,
    WTS_W,
    PART_H,
    RM,
    MK,
    M,
    H,
    R: tl.constexpr,
    ME: tl.constexpr,
    TB: tl.constexpr,
    KP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # per (source, token) with experts here, a chunk of columns of the sum over them of the source's weight
    # times the expert's row (float32), one bf16 row into the source's ``part`` at row t * R + ME
    pid = tl.program_id(0)
    NPROG = tl.num_programs(0)
    K = MK // M
    NCH = (H + BLOCK - 1) // BLOCK
    n_units = (RM + TB - 1) // TB * NCH
    ks = tl.arange(0, KP)
    tb = tl.arange(0, TB)
    cols = tl.arange(0, BLOCK)
    for unit in range(pid, n_units, NPROG):
        blk = unit // NCH
        offs = (unit - blk * NCH) * BLOCK + cols
        cm = offs < H
        st = blk * TB + tb  # s * M + t
        sv = st < RM
        src = st // M
        t = st - src * M
        base = st * K  # (src, t, 0) in inv and in the weight table
        inv = tl.load(inv_ptr + base[:, None] + ks[None, :], mask=sv[:, None] & (ks < K)[None, :], other=-1)
        here = tl.max((inv >= 0).to(tl.int32), axis=1) > 0
        acc = tl.zeros([TB, BLOCK], dtype=tl.float32)
        for kk in tl.static_range(KP):
            r = tl.load(inv_ptr + base + kk, mask=sv & (kk < K), other=-1)
            wk = tl.load(a32 + WTS_W + base + kk, mask=r >= 0, other=0).to(tl.float32, bitcast=True)
            yv = tl.load(
                y_ptr + r.to(tl.int64)[:, None] * H + offs[None, :], mask=(r >= 0)[:, None] & cm[None, :], other=0.0
            )
            acc += wk[:, None] * yv.to(tl.float32)
        prow = (
            tl.multiple_of(tl.load(dwords + src, mask=here, other=0), 16).to(tl.int64) * 2
            + PART_H
            + (t * R + ME).to(tl.int64) * H
        )
        tl.store(a16 + prow[:, None] + offs[None, :], acc.to(tl.bfloat16), mask=here[:, None] & cm[None, :])


@triton.jit
def _ll_reduce(
    a16,
    PART_H,
    idx_ptr,
    out_ptr,
    K,
    H,
    NCH,
    L,
    R: tl.constexpr,
    RP: tl.constexpr,
    KP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # one program per (token, BLOCK columns): the sum of the token's partial rows from the ranks it went to
    pid = tl.program_id(0)
    t = pid // NCH
    ks = tl.arange(0, KP)
    e = tl.load(idx_ptr + t * K + ks, mask=ks < K, other=-1)
    rr = tl.arange(0, RP)
    went = tl.max(((e[None, :] >= 0) & (e[None, :] // L == rr[:, None])).to(tl.int32), axis=1) > 0
    went = went & (rr < R)
    rows = PART_H + (t * R + rr).to(tl.int64) * H
    offs = (pid - t * NCH) * BLOCK + tl.arange(0, BLOCK)
    cm = offs < H
    v = tl.load(a16 + rows[:, None] + offs[None, :], mask=went[:, None] & cm[None, :], other=0.0)
    acc = tl.sum(v.to(tl.float32), axis=0)
    tl.store(out_ptr + t.to(tl.int64) * H + offs, acc.to(out_ptr.dtype.element_ty), mask=cm)


def _p2(n: int) -> int:
    return max(triton.next_power_of_2(max(int(n), 1)), 1)


def _items(R: int, M: int, K: int, L: int, jb: int, cap: int) -> int:
    """Programs for a receive or combine-send grid: the most non-empty blocks of ``jb`` rows (at most
    ``R * M * min(K, L)`` rows over ``L`` experts), capped at ``cap``."""
    return max(1, min(-(-R * M * min(K, L) // jb) + L, cap))


#: the kernels' launchers (compiled kernels cached per signature, launched with integer pointers: launch.py)
_LL_SEND = Launcher(_ll_send, num_warps=4)
_LL_RECV = Launcher(_ll_recv, num_warps=4)
_LL_PUT_WEIGHTS = Launcher(_ll_put_weights, num_warps=4)
_LL_COMBINE_SEND = Launcher(_ll_combine_send, num_warps=4)
_LL_REDUCE = Launcher(_ll_reduce, num_warps=4)


def send(x, topk_idx, arena, area_off, lay, err, round_scale: bool, use_ue8m0: bool) -> None:
    """Launch the send kernel (see the module docstring); ``lay`` is the area's layout."""
    T, H = x.shape
    K = topk_idx.size(1)
    fp8 = lay["fp8"]
    BB, BLOCK, EPP = 8, 512, 8
    nch = -(-(H // 128) // BB) if fp8 else -(-(H // 2) // BLOCK)
    grid = T * nch + -(-lay["E"] // EPP)
    _LL_SEND(
        (grid,),
        x,
        topk_idx,
        arena.u8,
        arena.i32,
        arena.dbytes,
        arena.dwords,
        err,
        T,
        H,
        lay["E"],
        lay["L"],
        lay["M"],
        K,
        nch,
        (area_off + lay["cnt"]) // 4,
        (area_off + lay["info"]) // 4,
        area_off + lay["data"],
        (area_off + lay["data"]) // 4,
        lay["rowb"],
        lay["rowb"] // 4,
        R=arena.num_ranks,
        ME=arena.rank,
        KP=_p2(K),
        TB=32,
        EPP=EPP,
        FP8=fp8,
        ROUND=bool(round_scale or use_ue8m0),
        UE8M0=bool(use_ue8m0),
        BB=BB,
        BLOCK=BLOCK,
    )


def recv(arena, area_off, lay, main, tail, count, src, inv, nsm: int) -> None:
    """Launch the receive kernel into ``main`` (int32 words ``[L * R * M, MW]``), ``tail`` (the scales,
    ``[L * R * M, SW]``, or ``None``), ``count`` (int32 ``[L]``), ``src`` (int32 ``[L * R * M]``) and
    ``inv`` (int32 ``[R * M * K]``, filled with -1 before: the row of each received (source, token, k))."""
    L, M, R = lay["L"], lay["M"], arena.num_ranks
    MW = main.size(1)
    SW = tail.size(1) if tail is not None else 0
    JB = 4
    _LL_RECV(
        (_items(R, M, lay["K"], L, JB, 16 * nsm),),
        arena.i32,
        (area_off + lay["cnt"]) // 4,
        (area_off + lay["info"]) // 4,
        (area_off + lay["data"]) // 4,
        lay["rowb"] // 16,
        main,
        tail if tail is not None else main,
        count,
        src,
        inv,
        L,
        M,
        M * lay["K"],
        MW,
        SW,
        R=R,
        RP=_p2(R),
        LP=_p2(L),
        JB=JB,
        BLOCK=512,
        TBLOCK=_p2(min(max(SW, 1), 64)),
        HAS_TAIL=tail is not None,
    )


def put_weights(topk_weights, arena, area_off, lay) -> None:
    """Store this rank's combine weights (float32 ``[T, K]``, contiguous) into slot ``rank`` of every rank's
    weight table (the combine's first step; a barrier must follow before :func:`combine_send`)."""
    w = topk_weights.view(torch.int32).reshape(-1)
    if w.numel():
        BLOCK = 1024
        _LL_PUT_WEIGHTS(
            (-(-w.numel() // BLOCK),),
            w,
            arena.i32,
            arena.dwords,
            (area_off + lay["wts"]) // 4,
            w.numel(),
            lay["M"] * lay["K"],
            R=arena.num_ranks,
            ME=arena.rank,
            BLOCK=BLOCK,
        )


def combine_send(y, inv, arena, area_off, lay, nsm: int) -> None:
    """The per-token weighted sums over this rank's experts of ``y`` (bf16 ``[L, R * M, H]``, contiguous),
    one bf16 row per (token, rank) into the token's rank (after :func:`put_weights` and a barrier); ``inv``:
    the row of each received (source, token, k), -1 where none (from :func:`recv`)."""
    M, R, H, K = lay["M"], arena.num_ranks, lay["H"], lay["K"]
    TB, BLOCK = 4, 512
    units = -(-R * M // TB) * -(-H // BLOCK)
    _LL_COMBINE_SEND(
        (max(1, min(units, 16 * nsm)),),
        y,
        inv,
        arena.i32,
        arena.bf16,
        arena.dwords,
        (area_off + lay["wts"]) // 4,
        (area_off + lay["part"]) // 2,
        R * M,
        M * K,
        M,
        H,
        R=R,
        ME=arena.rank,
        TB=TB,
        KP=_p2(K),
        BLOCK=BLOCK,
    )


def combine_reduce(arena, area_off, lay, topk_idx, out) -> None:
    """Launch the reduce kernel into ``out`` (``[T, H]``): per token, the partial rows of its ranks."""
    T, K = topk_idx.shape
    H, R = lay["H"], arena.num_ranks
    BLOCK = 1024
    nch = -(-H // BLOCK)
    _LL_REDUCE(
        (T * nch,),
        arena.bf16,
        (area_off + lay["part"]) // 2,
        topk_idx,
        out,
        K,
        H,
        nch,
        lay["L"],
        R=R,
        RP=_p2(max(R, 2)),
        KP=_p2(K),
        BLOCK=BLOCK,
    )
