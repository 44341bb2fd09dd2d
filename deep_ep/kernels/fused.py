"""Triton kernels of the nvlink transport's fused path (:mod:`deep_ep.transport.nvlink.fused`).

A fresh dispatch is one notify kernel and one data kernel; a cached dispatch one data kernel; a combine
one kernel. Ranks synchronise inside the kernels with flags, not with barriers between launches:

- every fused kernel has an *epoch* ``e``: the rank's device counter ``ctl[0]`` plus one (the last
  program of the kernel to finish stores ``e`` back), the same on every rank because every rank makes the
  same sequence of calls; the kernel uses data area ``e % 2`` and metadata area ``e % 2``;
- its sending programs store into the peers' memory (a peer's region is this rank's moved by the
  distance between the two buffers, ``delta[p]`` words); the last sending program to finish (a counter
  ``ctl[1]``) stores ``e`` into flag ``rank`` of every rank (release, system scope);
- its receiving programs wait (acquire) until flag ``s`` holds at least ``e`` for every rank ``s``, then
  read their own memory. Programs are ordered senders first, so a sequential execution (Triton's
  interpreter) never waits for a program of its own launch;
- a rank writes area ``e % 2`` of a peer only after its kernel ``e - 1`` saw that peer's flag ``e - 1``,
  which the peer raised after its kernel ``e - 2`` (the last use of that area) had finished: two areas
  and the flags order every reuse, for eager calls and CUDA-graph replays alike (the epoch lives on the
  device).

Waits are bounded (``%globaltimer`` on the GPU; under the interpreter a host watchdog stores
``ctl[CTL_GIVE_UP]``): a kernel that gives up records the ranks whose flags did not come in ``ctl[3]`` and,
for notify, in the host's mapped block. The word indices live in :mod:`deep_ep.kernels.protocol`.

Their oracle is :mod:`deep_ep.reference`, the plain-torch whole dispatch / combine (the twins of the pieces
of a call are the host path's: :mod:`deep_ep.kernels.twins`): ``tests/test_fused_kernels.py`` runs every
rank in one process (each kernel as two launches per rank, ``ROLE`` 1 then 2) and ``tests/test_fused.py``
one process per rank, both against it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import protocol as _protocol
from .plan import verdict

#: the protocol's words as compile-time constants (Triton compiles only constexpr globals into a kernel;
#: the interpreter takes plain ints, so only a GPU compile would catch a plain one: tests/test_kernels.py checks)
CTL_DONE = tl.constexpr(_protocol.CTL_DONE)
CTL_EPOCH = tl.constexpr(_protocol.CTL_EPOCH)
CTL_ERROR = tl.constexpr(_protocol.CTL_ERROR)
CTL_GIVE_UP = tl.constexpr(_protocol.CTL_GIVE_UP)
CTL_NOTIFY = tl.constexpr(_protocol.CTL_NOTIFY)
CTL_SENT = tl.constexpr(_protocol.CTL_SENT)
OUT_DONE = tl.constexpr(_protocol.OUT_DONE)
OUT_HEADERS = tl.constexpr(_protocol.OUT_HEADERS)
OUT_MISSING = tl.constexpr(_protocol.OUT_MISSING)
OUT_NRECV = tl.constexpr(_protocol.OUT_NRECV)
OUT_STATUS = tl.constexpr(_protocol.OUT_STATUS)
OUT_VERDICT = tl.constexpr(_protocol.OUT_VERDICT)
VERDICTS = tl.constexpr(_protocol.VERDICTS)


@triton.jit
def _now(INTERP: tl.constexpr):
    if INTERP:
        return tl.zeros([1], dtype=tl.int64).sum(axis=0)
    else:
        return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _wait_flags(
    flag_ptr,
    ctl_ptr,
    e,
    limit,
    RANK: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    SELF: tl.constexpr,
    INTERP: tl.constexpr,
):
    """Wait until ``flag[s] >= e`` for every rank ``s`` (``SELF``: this rank's too); ``limit``: nanoseconds on
    the GPU; under the interpreter the wait ends when the host's watchdog sets ``ctl[CTL_GIVE_UP]``. Returns the bit mask of the ranks still missing (0: all came)."""
    rr = tl.arange(0, RP)
    need = (rr < R) & ((rr != RANK) | SELF)
    got = tl.atomic_add(flag_ptr + rr, tl.zeros([RP], dtype=tl.int64), mask=need, sem="acquire", scope="sys")
    miss = tl.sum(tl.where(need & (got < e), 1 << rr.to(tl.int64), 0), axis=0)
    start = _now(INTERP)
    spins = 0
    while (miss != 0) & (spins >= 0):
        got = tl.atomic_add(flag_ptr + rr, tl.zeros([RP], dtype=tl.int64), mask=need, sem="acquire", scope="sys")
        miss = tl.sum(tl.where(need & (got < e), 1 << rr.to(tl.int64), 0), axis=0)
        spins += 1
        if INTERP:
            if tl.load(ctl_ptr + CTL_GIVE_UP) != 0:
                spins = -1
        else:
            if _now(INTERP) - start > limit:
                spins = -1
    return miss


@triton.jit
def _raise_flags(own_ptr, delta_ptr, FLAG_W, e, RANK: tl.constexpr, R: tl.constexpr, RP: tl.constexpr):
    """Store ``e`` into flag ``RANK`` of every rank (this one too), after everything this rank stored."""
    tl.debug_barrier()  # every thread's stores of this program before the release below
    rr = tl.arange(0, RP)
    rin = rr < R
    dst = own_ptr + tl.load(delta_ptr + rr, mask=rin, other=0) + FLAG_W + RANK
    tl.atomic_xchg(dst, tl.zeros([RP], dtype=tl.int64) + e, mask=rin, sem="release", scope="sys")


@triton.jit
def _finish(ctl_ptr, e, NPROG):
    """Count this program done; the last one of the launch stores the epoch (and resets the counters)."""
    tl.debug_barrier()  # every thread's stores of this program before the release below
    old = tl.atomic_add(ctl_ptr + CTL_DONE, 1, sem="acq_rel", scope="gpu")
    if old == NPROG - 1:
        tl.store(ctl_ptr + CTL_DONE, 0)
        tl.store(ctl_ptr + CTL_SENT, 0)
        tl.atomic_xchg(ctl_ptr + CTL_EPOCH, e, sem="release", scope="gpu")


@triton.jit
def _sent(ctl_ptr, own_ptr, delta_ptr, FLAG_W, e, NSEND, RANK: tl.constexpr, R: tl.constexpr, RP: tl.constexpr):
    """A sending program is done: the last of the launch raises this rank's flags."""
    tl.debug_barrier()  # every thread's stores of this program before the release below
    old = tl.atomic_add(ctl_ptr + CTL_SENT, 1, sem="acq_rel", scope="sys")
    if old == NSEND - 1:
        _raise_flags(own_ptr, delta_ptr, FLAG_W, e, RANK, R, RP)


# ---------------------------------------------------------------------------------------------- notify
@triton.jit
def _notify_kernel(
    mask_ptr,
    idx_ptr,
    pe_ptr,
    in_ptr,
    out_ptr,
    own_ptr,
    delta_ptr,
    chan_ptr,
    dev_ptr,
    rpm_ptr,
    T,
    K,
    E,
    L,
    NCH,
    CAP,
    CTL_W,
    FLAG_W,
    META_W,
    MS,
    limit,
    RANK: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    HDR: tl.constexpr,
    HP: tl.constexpr,
    FIELDS: tl.constexpr,
    H_ERR: tl.constexpr,
    H_WORST: tl.constexpr,
    H_E: tl.constexpr,
    EP: tl.constexpr,
    LP: tl.constexpr,
    HAS_IDX: tl.constexpr,
    KP: tl.constexpr,
    BT: tl.constexpr,
    INTERP: tl.constexpr,
    ROLE: tl.constexpr,
):
    """Programs ``0 .. NCH-1``: channel ``c``'s tokens per destination (``chan[c, :R]``) and expert-id range
    (``chan[c, R:R+2]``). Program ``NCH``: this rank's metadata row (header from ``in``, counts, id range,
    expert counts) into every rank's metadata area, the flags, the wait, then the plan from every rank's
    row: ``chan[c, R+2:2R+2]`` (where channel ``c``'s rows start at each destination), ``dev`` (int64:
    received rows, own rows' first and end row, ``rank_prefix_matrix`` [R, R] as int64, the received
    count per local expert [L], the verdict [4], the missing mask), and the host's mapped block ``out``.

    ``ROLE`` 0 runs everything (one launch); 1 the counting and publishing only, 2 the wait and the plan only
    (one program): two launches per rank whose order a test chooses (ranks emulated in one process)."""
    pid = tl.program_id(0)
    ctl_ptr = own_ptr + CTL_W
    rr = tl.arange(0, RP)
    rin = rr < R
    CW = 2 * R + 4  # words per channel row
    if (pid < NCH) & (ROLE != 2):
        chunk = (T + NCH - 1) // NCH
        t0 = pid * chunk
        t1 = tl.minimum(t0 + chunk, T)
        cnt = tl.zeros([RP], dtype=tl.int64)
        lo = tl.zeros([1], dtype=tl.int64).sum(axis=0) + (1 << 40)
        hi = tl.zeros([1], dtype=tl.int64).sum(axis=0) - (1 << 40)
        tb = tl.arange(0, BT)
        for b in range(t0, t1, BT):
            ts = (b + tb).to(tl.int64)
            tm = ts < t1
            m = tl.load(mask_ptr + ts[:, None] * R + rr[None, :], mask=tm[:, None] & rin[None, :], other=0)
            cnt += tl.sum(m.to(tl.int64), axis=0)
            if HAS_IDX:
                kk = tl.arange(0, KP)
                ids = tl.load(
                    idx_ptr + ts[:, None] * K + kk[None, :], mask=tm[:, None] & (kk < K)[None, :], other=0
                ).to(tl.int64)
                valid = tm[:, None] & (kk < K)[None, :]
                lo = tl.minimum(lo, tl.min(tl.where(valid, ids, 1 << 40)))
                hi = tl.maximum(hi, tl.max(tl.where(valid, ids, -(1 << 40))))
        tl.store(chan_ptr + pid * CW + rr, cnt, mask=rin)
        tl.store(chan_ptr + pid * CW + 2 * R + 2, lo)
        tl.store(chan_ptr + pid * CW + 2 * R + 3, hi)
        tl.debug_barrier()
        tl.atomic_add(ctl_ptr + CTL_NOTIFY, 1, sem="release", scope="gpu")
    else:
        if ROLE != 2:  # every channel program has counted (sequentially: they ran before this one)
            n_done = tl.atomic_add(ctl_ptr + CTL_NOTIFY, 0, sem="acquire", scope="gpu")
            while n_done < NCH:
                n_done = tl.atomic_add(ctl_ptr + CTL_NOTIFY, 0, sem="acquire", scope="gpu")
            tl.store(ctl_ptr + CTL_NOTIFY, 0)
        e = tl.load(ctl_ptr + CTL_EPOCH, volatile=True) + 1
        meta_w = META_W + (e % 2) * R * MS
        cc = tl.arange(0, 64)
        counts = tl.zeros([RP], dtype=tl.int64)
        lo = tl.zeros([1], dtype=tl.int64).sum(axis=0) + (1 << 40)
        hi = tl.zeros([1], dtype=tl.int64).sum(axis=0) - (1 << 40)
        for c0 in range(0, NCH, 64):
            ch = c0 + cc
            cm = ch < NCH
            blk = tl.load(chan_ptr + ch[:, None] * CW + rr[None, :], mask=cm[:, None] & rin[None, :], other=0)
            counts += tl.sum(blk, axis=0)
            lo = tl.minimum(lo, tl.min(tl.load(chan_ptr + ch * CW + 2 * R + 2, mask=cm, other=1 << 40)))
            hi = tl.maximum(hi, tl.max(tl.load(chan_ptr + ch * CW + 2 * R + 3, mask=cm, other=-(1 << 40))))
        if not HAS_IDX:
            lo = lo * 0 - 1
            hi = hi * 0 - 1
        if T == 0:
            lo = lo * 0 - 1
            hi = hi * 0 - 1
        hh = tl.arange(0, HP)
        if ROLE != 2:  # this rank's row into every rank's metadata area (header, counts, id range, experts)
            hdr = tl.load(in_ptr + hh, mask=hh < HDR, other=0)
            ee = tl.arange(0, EP)
            pe = tl.load(pe_ptr + ee, mask=ee < E, other=0).to(tl.int64)
            for p in tl.static_range(R):
                row = own_ptr + tl.load(delta_ptr + p) + meta_w + RANK * MS
                tl.store(row + hh, hdr, mask=hh < HDR)
                tl.store(row + HDR + rr, counts, mask=rin)
                tl.store(row + HDR + R, lo)
                tl.store(row + HDR + R + 1, hi)
                tl.store(row + HDR + R + 2 + ee, pe, mask=ee < E)
            _raise_flags(own_ptr, delta_ptr, FLAG_W, e, RANK, R, RP)
        if ROLE != 1:
            _notify_plan(
                own_ptr,
                chan_ptr,
                dev_ptr,
                rpm_ptr,
                out_ptr,
                in_ptr,
                e,
                meta_w,
                T,
                L,
                NCH,
                CAP,
                CTL_W,
                FLAG_W,
                MS,
                limit,
                RANK,
                R,
                RP,
                HDR,
                HP,
                FIELDS,
                H_ERR,
                H_WORST,
                H_E,
                LP,
                INTERP,
            )


@triton.jit
def _notify_plan(
    own_ptr,
    chan_ptr,
    dev_ptr,
    rpm_ptr,
    out_ptr,
    in_ptr,
    e,
    meta_w,
    T,
    L,
    NCH,
    CAP,
    CTL_W,
    FLAG_W,
    MS,
    limit,
    RANK: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    HDR: tl.constexpr,
    HP: tl.constexpr,
    FIELDS: tl.constexpr,
    H_ERR: tl.constexpr,
    H_WORST: tl.constexpr,
    H_E: tl.constexpr,
    LP: tl.constexpr,
    INTERP: tl.constexpr,
):
    """The notify's second half: wait for every rank's row, then the plan (see :func:`_notify_kernel`)."""
    ctl_ptr = own_ptr + CTL_W
    rr = tl.arange(0, RP)
    rin = rr < R
    hh = tl.arange(0, HP)
    CW = 2 * R + 4
    miss = _wait_flags(own_ptr + FLAG_W, ctl_ptr, e, limit, RANK, R, RP, False, INTERP)
    # every rank's row is here: the plan
    mine = own_ptr + meta_w
    full = rin[:, None] & rin[None, :]
    C = tl.load(mine + rr[:, None] * MS + HDR + rr[None, :], mask=full, other=0)  # C[s][d]
    rpm = tl.cumsum(C, axis=0)
    col_me = tl.sum(tl.where(rr[None, :] == RANK, C, 0), axis=1)  # C[s][RANK]
    n_recv = tl.sum(col_me, axis=0)
    before_me = tl.sum(tl.where(rr < RANK, col_me, 0), axis=0)
    own_n = tl.sum(tl.where(rr == RANK, col_me, 0), axis=0)
    base = tl.sum(tl.where(rr[:, None] < RANK, C, 0), axis=0)  # [d]: rows ranks < RANK send to d
    # where each channel's rows start at each destination
    run = base
    for c in range(0, NCH):
        tl.store(chan_ptr + c * CW + R + 2 + rr, run, mask=rin)
        run += tl.load(chan_ptr + c * CW + rr, mask=rin, other=0)
    # received rows per local expert
    ll = tl.arange(0, LP)
    pe_all = tl.load(
        mine + rr[:, None] * MS + HDR + R + 2 + RANK * L + ll[None, :], mask=rin[:, None] & (ll < L)[None, :], other=0
    )
    per_local = tl.sum(pe_all, axis=0)
    # the verdict (the device plan's, :func:`deep_ep.kernels.plan.verdict`), and the area's capacity
    mismatch, over, bad = verdict(mine, MS, C, RANK, R, RP, HDR, HP, FIELDS, H_ERR, H_WORST, H_E)
    received = tl.sum(C, axis=0)  # rows each rank receives
    los = tl.load(mine + rr * MS + HDR + R, mask=rin, other=0)
    his = tl.load(mine + rr * MS + HDR + R + 1, mask=rin, other=0)
    full_area = tl.sum(tl.where(rin & (received > CAP), 1, 0), axis=0) > 0
    # the device's copy of the plan
    tl.store(dev_ptr + 0, n_recv)
    tl.store(dev_ptr + 1, before_me)
    tl.store(dev_ptr + 2, before_me + own_n)
    tl.store(dev_ptr + 3 + rr[:, None] * R + rr[None, :], rpm, mask=full)
    tl.store(rpm_ptr + rr[:, None] * R + rr[None, :], rpm.to(tl.int32), mask=full)
    tl.store(dev_ptr + 3 + R * R + ll, per_local, mask=ll < L)
    vbase = dev_ptr + 3 + R * R + L
    tl.store(vbase + 0, mismatch.to(tl.int64))
    tl.store(vbase + 1, over.to(tl.int64))
    tl.store(vbase + 2, bad.to(tl.int64))
    tl.store(vbase + 3, full_area.to(tl.int64))
    tl.store(vbase + 4, miss)
    # the host's mapped block: what it reads once (the count, the verdict, every rank's header)
    tl.store(out_ptr + OUT_STATUS, (miss != 0).to(tl.int64))
    tl.store(out_ptr + OUT_MISSING, miss)
    tl.store(out_ptr + OUT_NRECV, n_recv)
    tl.store(out_ptr + OUT_VERDICT + 0, mismatch.to(tl.int64))
    tl.store(out_ptr + OUT_VERDICT + 1, over.to(tl.int64))
    tl.store(out_ptr + OUT_VERDICT + 2, bad.to(tl.int64))
    tl.store(out_ptr + OUT_VERDICT + 3, full_area.to(tl.int64))
    hdrs = tl.load(mine + rr[:, None] * MS + hh[None, :], mask=rin[:, None] & (hh < HDR)[None, :], other=0)
    tl.store(out_ptr + OUT_HEADERS + rr[:, None] * HDR + hh[None, :], hdrs, mask=rin[:, None] & (hh < HDR)[None, :])
    cb = OUT_HEADERS + R * HDR
    tl.store(out_ptr + cb + rr[:, None] * R + rr[None, :], C, mask=full)
    tl.store(out_ptr + cb + R * R + rr, los, mask=rin)
    tl.store(out_ptr + cb + R * R + R + rr, his, mask=rin)
    tl.store(out_ptr + cb + R * R + 2 * R + ll, per_local, mask=ll < L)
    ticket = tl.load(in_ptr + HDR)
    tl.debug_barrier()
    tl.atomic_xchg(out_ptr + OUT_DONE, ticket, sem="release", scope="sys")
    tl.atomic_xchg(ctl_ptr + CTL_EPOCH, e, sem="release", scope="gpu")


# ---------------------------------------------------------------------------------------------- dispatch
@triton.jit
def _put_rows(src_ptr, dst_own_ptr, dst_peer_ptr, ts, rows_t, pos, sent, d, W, BLOCK: tl.constexpr, ME: tl.constexpr):
    """Rows ``ts`` of ``src`` (words ``[*, W]``) to rows ``pos`` of the destination (own output or peer
    region) where ``sent``."""
    cols = tl.arange(0, BLOCK)
    for c in range(0, W, BLOCK):
        offs = c + cols
        cm = (offs < W)[None, :]
        v = tl.load(src_ptr + ts[:, None] * W + offs[None, :], mask=rows_t[:, None] & cm)
        if d == ME:
            tl.store(dst_own_ptr + pos[:, None] * W + offs[None, :], v, mask=sent[:, None] & cm)
        else:
            tl.store(dst_peer_ptr + pos[:, None] * W + offs[None, :], v, mask=sent[:, None] & cm)


@triton.jit
def _dispatch_kernel(
    mask_ptr,
    chan_ptr,
    dev_ptr,
    own_ptr,
    delta_ptr,
    slot_ptr,
    x_ptr,
    ox_ptr,
    s_ptr,
    os_ptr,
    i_ptr,
    oi_ptr,
    w_ptr,
    ow_ptr,
    T,
    N,
    CAP,
    WX,
    WS,
    K,
    L,
    NCH,
    NRECV,
    CTL_W,
    FLAG_W,
    AREA_W,
    AREA_STRIDE_W,
    RX_W,
    RS_W,
    RI_W,
    RW_W,
    limit,
    RANK: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    HAS_S: tl.constexpr,
    HAS_I: tl.constexpr,
    HAS_W: tl.constexpr,
    WRITE_SLOT: tl.constexpr,
    KP: tl.constexpr,
    TOK: tl.constexpr,
    BX: tl.constexpr,
    BS: tl.constexpr,
    INTERP: tl.constexpr,
    ROLE: tl.constexpr,
):
    """Programs ``0 .. NCH-1`` send channel ``c``'s tokens: each token's rows to row ``pos`` of every rank
    it goes to (``pos`` = where channel ``c``'s rows start there, ``chan[c, R+2+d]``, plus its place among
    the channel's tokens for ``d``): its own rows straight into the outputs, the others into the peer's data
    area (region words ``RX_W`` ... of area ``e % 2``); the top-k ids as the destination's local ids (-1
    elsewhere) and the weights masked alike; with ``WRITE_SLOT`` each (token, rank) row into ``slot``.
    Programs ``NCH ..`` receive: after every peer's flag, the rows of the area into the outputs (rows
    ``< dev[0]``, this rank's own ``[dev[1], dev[2])`` already there) and zero padding up to ``N``
    (top-k ids -1). Word pointers: x / scales as integer words, ids int64, weights int32 (float bits).

    ``ROLE`` 0: one launch of ``NCH + NRECV`` programs; 1: the ``NCH`` senders only; 2: the ``NRECV``
    receivers only (ranks emulated in one process run every rank's senders, then every rank's receivers)."""
    pid = tl.program_id(0) + (NCH if ROLE == 2 else 0)
    ctl_ptr = own_ptr + CTL_W
    rr = tl.arange(0, RP)
    rin = rr < R
    e = tl.load(ctl_ptr + CTL_EPOCH, volatile=True) + 1
    area = AREA_W + (e % 2) * AREA_STRIDE_W  # int64 words of the area in every rank's buffer
    CW = 2 * R + 4
    tb = tl.arange(0, TOK)
    kk = tl.arange(0, KP)
    if pid < NCH:
        chunk = (T + NCH - 1) // NCH
        t0 = pid * chunk
        t1 = tl.minimum(t0 + chunk, T)
        running = tl.load(chan_ptr + pid * CW + R + 2 + rr, mask=rin, other=0)
        for b in range(t0, t1, TOK):
            ts = (b + tb).to(tl.int64)
            tm = ts < t1
            m = tl.load(mask_ptr + ts[:, None] * R + rr[None, :], mask=tm[:, None] & rin[None, :], other=0)
            m = m.to(tl.int64)
            pos = running[None, :] + tl.cumsum(m, axis=0) - 1  # [TOK, RP]
            running += tl.sum(m, axis=0)
            # rows past the output (num_worst_tokens too small) or past a peer's area are dropped: the
            # notify's verdict reports them (at the next call when it is deferred); no write out of bounds
            lim = tl.where(rr == RANK, N, CAP)
            keep = (m > 0) & (pos < lim[None, :])
            if WRITE_SLOT:
                tl.store(
                    slot_ptr + ts[:, None] * R + rr[None, :],
                    tl.where(keep, pos, -1).to(tl.int32),
                    mask=tm[:, None] & rin[None, :],
                )
            if HAS_I:
                ids = tl.load(i_ptr + ts[:, None] * K + kk[None, :], mask=tm[:, None] & (kk < K)[None, :], other=-1)
            if HAS_W:
                wts = tl.load(
                    w_ptr.to(tl.pointer_type(tl.int32)) + ts[:, None] * K + kk[None, :],
                    mask=tm[:, None] & (kk < K)[None, :],
                    other=0,
                )  # float32 weights moved as their bits
            for d in tl.static_range(R):
                sent = tm & (tl.sum(tl.where(rr[None, :] == d, keep.to(tl.int32), 0), axis=1) > 0)
                p = tl.sum(tl.where(rr[None, :] == d, pos, 0), axis=1)
                p = tl.where(sent, p, 0)
                peer = own_ptr + tl.load(delta_ptr + d) + area  # the area in rank d's buffer (int64 words)
                _put_rows(x_ptr, ox_ptr, peer.to(ox_ptr.dtype) + RX_W, ts, tm, p, sent, d, WX, BX, RANK)
                if HAS_S:
                    _put_rows(s_ptr, os_ptr, peer.to(os_ptr.dtype) + RS_W, ts, tm, p, sent, d, WS, BS, RANK)
                if HAS_I:
                    loc = tl.where((ids >= d * L) & (ids < d * L + L), ids - d * L, -1)
                    im = sent[:, None] & (kk < K)[None, :]
                    if d == RANK:
                        tl.store(oi_ptr + p[:, None] * K + kk[None, :], loc, mask=im)
                    else:
                        tl.store(peer + RI_W + p[:, None] * K + kk[None, :], loc, mask=im)
                    if HAS_W:
                        wl = tl.where(loc >= 0, wts, 0)
                        if d == RANK:
                            tl.store(ow_ptr.to(tl.pointer_type(tl.int32)) + p[:, None] * K + kk[None, :], wl, mask=im)
                        else:
                            tl.store(
                                peer.to(tl.pointer_type(tl.int32)) + RW_W + p[:, None] * K + kk[None, :], wl, mask=im
                            )
        _sent(ctl_ptr, own_ptr, delta_ptr, FLAG_W, e, NCH, RANK, R, RP)
        if ROLE == 0:
            _finish(ctl_ptr, e, NCH + NRECV)
    else:
        miss = _wait_flags(own_ptr + FLAG_W, ctl_ptr, e, limit, RANK, R, RP, False, INTERP)
        if miss != 0:
            tl.atomic_or(ctl_ptr + CTL_ERROR, miss)
        n = tl.load(dev_ptr + 0)
        lo = tl.load(dev_ptr + 1)
        hi = tl.load(dev_ptr + 2)
        me = own_ptr + area
        for r0 in range((pid - NCH) * TOK, N, NRECV * TOK):
            rs = (r0 + tb).to(tl.int64)
            inside = rs < N
            take = inside & (rs < n) & ((rs < lo) | (rs >= hi)) & (rs < CAP)
            pad = inside & (rs >= n)
            _copy_rows(me.to(ox_ptr.dtype) + RX_W, ox_ptr, rs, take, pad, WX, BX)
            if HAS_S:
                _copy_rows(me.to(os_ptr.dtype) + RS_W, os_ptr, rs, take, pad, WS, BS)
            if HAS_I:
                im = (kk < K)[None, :]
                v = tl.load(me + RI_W + rs[:, None] * K + kk[None, :], mask=take[:, None] & im, other=-1)
                tl.store(oi_ptr + rs[:, None] * K + kk[None, :], v, mask=(take | pad)[:, None] & im)
                if HAS_W:
                    wv = tl.load(
                        me.to(tl.pointer_type(tl.int32)) + RW_W + rs[:, None] * K + kk[None, :],
                        mask=take[:, None] & im,
                        other=0,
                    )
                    tl.store(
                        ow_ptr.to(tl.pointer_type(tl.int32)) + rs[:, None] * K + kk[None, :],
                        wv,
                        mask=(take | pad)[:, None] & im,
                    )
        _finish(ctl_ptr, e, NRECV if ROLE == 2 else NCH + NRECV)


@triton.jit
def _copy_rows(src_ptr, dst_ptr, rs, take, pad, W, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    for c in range(0, W, BLOCK):
        offs = c + cols
        cm = (offs < W)[None, :]
        v = tl.load(src_ptr + rs[:, None] * W + offs[None, :], mask=take[:, None] & cm, other=0)
        tl.store(dst_ptr + rs[:, None] * W + offs[None, :], v, mask=(take | pad)[:, None] & cm)


# ---------------------------------------------------------------------------------------------- combine
@triton.jit
def _combine_kernel(
    x_ptr,
    w_ptr,
    slot_ptr,
    rpm_ptr,
    dev_ptr,
    own_ptr,
    delta_ptr,
    b0_ptr,
    b1_ptr,
    out_ptr,
    ow_ptr,
    T,
    H,
    K,
    NX,
    CAP,
    NSEND,
    NRED,
    CTL_W,
    FLAG_W,
    AREA_W,
    AREA_STRIDE_W,
    RX_W,
    RW_W,
    limit,
    RANK: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    HAS_W: tl.constexpr,
    NB: tl.constexpr,
    KP: tl.constexpr,
    TOK: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERP: tl.constexpr,
    ROLE: tl.constexpr,
):
    """Programs ``0 .. NSEND-1`` return every received row of a peer (rows ``< dev[0]``, its own rows not)
    into that peer's area, at the row's place in the peer's send order (destination-major), with its
    weights; programs ``NSEND ..`` reduce, after every peer's flag, each token's rows in ascending rank
    order (this rank's from ``x`` itself) in float32, add the biases and store ``x.dtype``. ``ROLE`` as in
    :func:`_dispatch_kernel`. Rows past ``x``'s ``NX`` or a peer's area (``CAP`` rows; a plan whose deferred
    verdict failed) are neither read nor written."""
    pid = tl.program_id(0) + (NSEND if ROLE == 2 else 0)
    ctl_ptr = own_ptr + CTL_W
    rr = tl.arange(0, RP)
    rin = rr < R
    full = rin[:, None] & rin[None, :]
    e = tl.load(ctl_ptr + CTL_EPOCH, volatile=True) + 1
    area = AREA_W + (e % 2) * AREA_STRIDE_W
    # counts from the prefix matrix: C[s][d] = rpm[s][d] - rpm[s-1][d]
    rpm = tl.load(rpm_ptr + rr[:, None] * R + rr[None, :], mask=full, other=0).to(tl.int64)
    prev = tl.load(rpm_ptr + (rr[:, None] - 1) * R + rr[None, :], mask=full & (rr[:, None] > 0), other=0).to(tl.int64)
    C = rpm - prev
    sendbase = tl.cumsum(C, axis=1) - C  # [s][d]: rows s sends to ranks < d (s's send order)
    tb = tl.arange(0, TOK)
    cols = tl.arange(0, BLOCK)
    kk = tl.arange(0, KP)
    if pid < NSEND:
        n = tl.load(dev_ptr + 0)
        col_me = tl.sum(tl.where(rr[None, :] == RANK, C, 0), axis=1)  # rows from each source
        first = tl.cumsum(col_me, axis=0) - col_me  # where each source's rows start
        at_me = tl.sum(tl.where(rr[None, :] == RANK, sendbase, 0), axis=1)  # [s]: sendbase[s][RANK]
        for r0 in range(pid * TOK, n, NSEND * TOK):
            rs = (r0 + tb).to(tl.int64)
            inside = (rs < n) & (rs < NX)
            src = tl.sum((rs[:, None] >= first[None, :]).to(tl.int32) * rin[None, :].to(tl.int32), axis=1) - 1
            for s in tl.static_range(R):
                if s != RANK:
                    f_s = tl.sum(tl.where(rr == s, first, 0), axis=0)
                    a_s = tl.sum(tl.where(rr == s, at_me, 0), axis=0)
                    dst = a_s + rs - f_s
                    go = inside & (src == s) & (dst < CAP)
                    peer = own_ptr + tl.load(delta_ptr + s) + area
                    px = peer.to(x_ptr.dtype) + RX_W
                    for c in range(0, H, BLOCK):
                        offs = c + cols
                        cm = (offs < H)[None, :]
                        v = tl.load(x_ptr + rs[:, None] * H + offs[None, :], mask=go[:, None] & cm)
                        tl.store(px + dst[:, None] * H + offs[None, :], v, mask=go[:, None] & cm)
                    if HAS_W:
                        km = go[:, None] & (kk < K)[None, :]
                        wv = tl.load(w_ptr + rs[:, None] * K + kk[None, :], mask=km)
                        tl.store(
                            peer.to(tl.pointer_type(tl.float32)) + RW_W + dst[:, None] * K + kk[None, :], wv, mask=km
                        )
        _sent(ctl_ptr, own_ptr, delta_ptr, FLAG_W, e, NSEND, RANK, R, RP)
        if ROLE == 0:
            _finish(ctl_ptr, e, NSEND + NRED)
    else:
        miss = _wait_flags(own_ptr + FLAG_W, ctl_ptr, e, limit, RANK, R, RP, False, INTERP)
        if miss != 0:
            tl.atomic_or(ctl_ptr + CTL_ERROR, miss)
        base_me = tl.sum(tl.where(rr[:, None] < RANK, C, 0), axis=0)  # [d]: rows ranks < RANK send to d
        send_me = tl.sum(tl.where(rr[:, None] == RANK, sendbase, 0), axis=0)  # [d]: my send order's starts
        me = own_ptr + area
        mx = me.to(x_ptr.dtype) + RX_W
        NCOL = (H + BLOCK - 1) // BLOCK
        units = ((T + TOK - 1) // TOK) * NCOL
        for u in range(pid - NSEND, units, NRED):
            tblk = u // NCOL
            ts = (tblk * TOK + tb).to(tl.int64)
            tm = ts < T
            offs = (u - tblk * NCOL) * BLOCK + cols
            cm = offs < H
            acc = tl.zeros([TOK, BLOCK], dtype=tl.float32)
            for d in tl.static_range(R):
                sl = tl.load(slot_ptr + ts * R + d, mask=tm, other=-1).to(tl.int64)
                ok = tm & (sl >= 0)
                if d == RANK:
                    ok = ok & (sl < NX)
                    v = tl.load(x_ptr + sl[:, None] * H + offs[None, :], mask=ok[:, None] & cm[None, :], other=0.0)
                else:
                    b_d = tl.sum(tl.where(rr == d, base_me, 0), axis=0)
                    s_d = tl.sum(tl.where(rr == d, send_me, 0), axis=0)
                    row = s_d + sl - b_d
                    ok = ok & (row < CAP)
                    v = tl.load(mx + row[:, None] * H + offs[None, :], mask=ok[:, None] & cm[None, :], other=0.0)
                acc += v.to(tl.float32)
            if NB >= 1:
                acc += tl.load(b0_ptr + ts[:, None] * H + offs[None, :], mask=tm[:, None] & cm[None, :], other=0.0).to(
                    tl.float32
                )
            if NB >= 2:
                acc += tl.load(b1_ptr + ts[:, None] * H + offs[None, :], mask=tm[:, None] & cm[None, :], other=0.0).to(
                    tl.float32
                )
            tl.store(
                out_ptr + ts[:, None] * H + offs[None, :],
                acc.to(out_ptr.dtype.element_ty),
                mask=tm[:, None] & cm[None, :],
            )
            if HAS_W:
                if u - tblk * NCOL == 0:  # the weights once per token block
                    km = (kk < K)[None, :]
                    accw = tl.zeros([TOK, KP], dtype=tl.float32)
                    for d in tl.static_range(R):
                        sl = tl.load(slot_ptr + ts * R + d, mask=tm, other=-1).to(tl.int64)
                        ok = tm & (sl >= 0)
                        if d == RANK:
                            ok = ok & (sl < NX)
                            wv = tl.load(w_ptr + sl[:, None] * K + kk[None, :], mask=ok[:, None] & km, other=0.0)
                        else:
                            b_d = tl.sum(tl.where(rr == d, base_me, 0), axis=0)
                            s_d = tl.sum(tl.where(rr == d, send_me, 0), axis=0)
                            row = s_d + sl - b_d
                            ok = ok & (row < CAP)
                            wv = tl.load(
                                me.to(tl.pointer_type(tl.float32)) + RW_W + row[:, None] * K + kk[None, :],
                                mask=ok[:, None] & km,
                                other=0.0,
                            )
                        accw += wv
                    tl.store(ow_ptr + ts[:, None] * K + kk[None, :], accw, mask=tm[:, None] & km)
        _finish(ctl_ptr, e, NRED if ROLE == 2 else NSEND + NRED)
