"""Triton kernels of the nvlink transport's device path (``num_worst_tokens`` calls, no host sync).

Each is the twin of a torch function in :mod:`deep_ep.transport.nvlink.device_path`
and runs on a persistent grid of at most ``Config.num_sms`` programs, each
moving a tile of ``TOK`` rows x ``BLOCK`` integer words per step (16-byte
vectors; several rows in flight per program keep NVLink busy with few SMs).
A destination region on another GPU is this rank's own region of the
symmetric buffer moved by the distance (in words, int64 per rank) between
the two ranks' buffers in this process's address space; the distances are
multiples of 16 words, which the kernels declare so that stores stay 16-byte
vectors.

- :func:`scatter_rows`: every token's row to its slot at each destination
  rank (``slot[t, d]``, ``-1`` = not sent): into the peer's staging for
  ``d != rank``, straight into this rank's output for ``d == rank``.
- :func:`copy_out`: received rows from this rank's staging into the output,
  skipping its own rows (already there) and zeroing the padding rows.
- :func:`return_blocks`: for each source rank, one block of rows of the
  combine input back into that rank's staging.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scatter_one(
    pid,
    src_ptr,
    slot_ptr,
    out_ptr,
    region_ptr,
    delta_ptr,
    T,
    W,
    CAP,
    OUT_ROWS,
    R: tl.constexpr,
    ME: tl.constexpr,
    NPROG: tl.constexpr,
    TOK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    cols = tl.arange(0, BLOCK)
    toks = tl.arange(0, TOK)
    for t0 in range(pid * TOK, T, NPROG * TOK):
        ts = (t0 + toks).to(tl.int64)
        inside = ts < T
        src_rows = src_ptr + ts[:, None] * W
        for c in range(0, W, BLOCK):
            offs = c + cols
            cm = (offs < W)[None, :]
            v = tl.load(src_rows + offs[None, :], mask=inside[:, None] & cm)
            for d in tl.static_range(R):
                slot = tl.load(slot_ptr + ts * R + d, mask=inside, other=-1)
                if d == ME:
                    ok = (slot >= 0) & (slot < OUT_ROWS)
                    dst = out_ptr + slot[:, None] * W
                else:
                    ok = (slot >= 0) & (slot < CAP)
                    # the peer's region is this rank's, moved by the (aligned) distance between the buffers
                    dst = region_ptr + tl.multiple_of(tl.load(delta_ptr + d), 16) + slot[:, None] * W
                tl.store(dst + offs[None, :], v, mask=ok[:, None] & cm)


@triton.jit
def _scatter_kernel(
    slot_ptr,
    T,
    CAP,
    OUT_ROWS,
    s0,
    o0,
    g0,
    d0,
    W0,
    s1,
    o1,
    g1,
    d1,
    W1,
    s2,
    o2,
    g2,
    d2,
    W2,
    s3,
    o3,
    g3,
    d3,
    W3,
    NT: tl.constexpr,
    R: tl.constexpr,
    ME: tl.constexpr,
    NPROG: tl.constexpr,
    TOK0: tl.constexpr,
    BLOCK0: tl.constexpr,
    TOK1: tl.constexpr,
    BLOCK1: tl.constexpr,
    TOK2: tl.constexpr,
    BLOCK2: tl.constexpr,
    TOK3: tl.constexpr,
    BLOCK3: tl.constexpr,
):
    pid = tl.program_id(0)
    _scatter_one(pid, s0, slot_ptr, o0, g0, d0, T, W0, CAP, OUT_ROWS, R, ME, NPROG, TOK0, BLOCK0)
    if NT > 1:
        _scatter_one(pid, s1, slot_ptr, o1, g1, d1, T, W1, CAP, OUT_ROWS, R, ME, NPROG, TOK1, BLOCK1)
    if NT > 2:
        _scatter_one(pid, s2, slot_ptr, o2, g2, d2, T, W2, CAP, OUT_ROWS, R, ME, NPROG, TOK2, BLOCK2)
    if NT > 3:
        _scatter_one(pid, s3, slot_ptr, o3, g3, d3, T, W3, CAP, OUT_ROWS, R, ME, NPROG, TOK3, BLOCK3)


@triton.jit
def _copy_out_one(pid, src_ptr, dst_ptr, n, lo, hi, N, W, NPROG: tl.constexpr, TOK: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    toks = tl.arange(0, TOK)
    for r0 in range(pid * TOK, N, NPROG * TOK):
        rs = (r0 + toks).to(tl.int64)
        inside = rs < N
        take = inside & (rs < n) & ((rs < lo) | (rs >= hi))
        write = take | (inside & (rs >= n))
        for c in range(0, W, BLOCK):
            offs = c + cols
            cm = (offs < W)[None, :]
            v = tl.load(src_ptr + rs[:, None] * W + offs[None, :], mask=take[:, None] & cm, other=0)
            tl.store(dst_ptr + rs[:, None] * W + offs[None, :], v, mask=write[:, None] & cm)


@triton.jit
def _copy_out_kernel(
    bounds_ptr,
    N,
    s0,
    o0,
    W0,
    s1,
    o1,
    W1,
    s2,
    o2,
    W2,
    s3,
    o3,
    W3,
    NT: tl.constexpr,
    NPROG: tl.constexpr,
    TOK0: tl.constexpr,
    BLOCK0: tl.constexpr,
    TOK1: tl.constexpr,
    BLOCK1: tl.constexpr,
    TOK2: tl.constexpr,
    BLOCK2: tl.constexpr,
    TOK3: tl.constexpr,
    BLOCK3: tl.constexpr,
):
    pid = tl.program_id(0)
    n = tl.load(bounds_ptr)
    lo = tl.load(bounds_ptr + 1)
    hi = tl.load(bounds_ptr + 2)
    _copy_out_one(pid, s0, o0, n, lo, hi, N, W0, NPROG, TOK0, BLOCK0)
    if NT > 1:
        _copy_out_one(pid, s1, o1, n, lo, hi, N, W1, NPROG, TOK1, BLOCK1)
    if NT > 2:
        _copy_out_one(pid, s2, o2, n, lo, hi, N, W2, NPROG, TOK2, BLOCK2)
    if NT > 3:
        _copy_out_one(pid, s3, o3, n, lo, hi, N, W3, NPROG, TOK3, BLOCK3)


@triton.jit
def _return_one(
    pid,
    src_ptr,
    table_ptr,
    region_ptr,
    delta_ptr,
    W,
    CAP,
    R: tl.constexpr,
    ME: tl.constexpr,
    NPROG: tl.constexpr,
    TOK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    cols = tl.arange(0, BLOCK)
    toks = tl.arange(0, TOK)
    for d in tl.static_range(R):
        if d != ME:
            first = tl.load(table_ptr + d * 3)
            cnt = tl.load(table_ptr + d * 3 + 1).to(tl.int32)
            at = tl.load(table_ptr + d * 3 + 2)
            base = region_ptr + tl.multiple_of(tl.load(delta_ptr + d), 16)
            for i0 in range(pid * TOK, cnt, NPROG * TOK):
                i = (i0 + toks).to(tl.int64)
                ok = (i < cnt) & (at + i < CAP)
                for c in range(0, W, BLOCK):
                    offs = c + cols
                    m = ok[:, None] & (offs < W)[None, :]
                    v = tl.load(src_ptr + (first + i)[:, None] * W + offs[None, :], mask=m)
                    tl.store(base + (at + i)[:, None] * W + offs[None, :], v, mask=m)


@triton.jit
def _return_kernel(
    table_ptr,
    CAP,
    s0,
    g0,
    d0,
    W0,
    s1,
    g1,
    d1,
    W1,
    NT: tl.constexpr,
    R: tl.constexpr,
    ME: tl.constexpr,
    NPROG: tl.constexpr,
    TOK0: tl.constexpr,
    BLOCK0: tl.constexpr,
    TOK1: tl.constexpr,
    BLOCK1: tl.constexpr,
):
    pid = tl.program_id(0)
    _return_one(pid, s0, table_ptr, g0, d0, W0, CAP, R, ME, NPROG, TOK0, BLOCK0)
    if NT > 1:
        _return_one(pid, s1, table_ptr, g1, d1, W1, CAP, R, ME, NPROG, TOK1, BLOCK1)


def _tile(W: int, elem: int):
    """``(BLOCK, TOK)``: words per row piece and rows per step (about 16 KiB per step)."""
    block = max(16 // elem, min(triton.next_power_of_2(max(W, 1)), 4096 // elem))
    tok = max(1, min(64, 16384 // (block * elem)))
    return block, triton.next_power_of_2(tok)


def _programs(num_programs: int, rows: int, tok: int) -> int:
    return max(1, min(int(num_programs), triton.cdiv(max(rows, 1), tok)))


#: most row tensors one launch moves (a dispatch moves x, its scales, the top-k ids and weights)
MAX_TENSORS = 4


def _pad(items, n, fill):
    return list(items) + [fill] * (n - len(items))


def scatter_rows(src, slot: torch.Tensor, out, region, delta, rank: int, num_programs: int) -> None:
    """``src[t]`` to row ``slot[t, d]`` of each destination ``d``: ``out`` for ``d == rank`` (rows
    ``< out.size(0)``), else rank ``d``'s copy of ``region`` (``[cap, W]`` in this rank's symmetric
    buffer; rank ``d``'s starts ``delta[d]`` words away; rows ``< cap``). ``src``, ``out``, ``region``
    and ``delta`` may be lists (up to :data:`MAX_TENSORS` row tensors of the same tokens, each in one
    integer word dtype, in one launch; every region has ``cap`` rows)."""
    srcs, outs, regions, deltas = ([a] if isinstance(a, torch.Tensor) else list(a) for a in (src, out, region, delta))
    T = srcs[0].size(0)
    keep = [i for i, t in enumerate(srcs) if t.size(1) > 0]
    if T == 0 or not keep:
        return
    srcs, outs, regions, deltas = ([a[i] for i in keep] for a in (srcs, outs, regions, deltas))
    if len(srcs) > MAX_TENSORS:  # (more than a dispatch moves: several launches)
        for i in range(0, len(srcs), MAX_TENSORS):
            j = slice(i, i + MAX_TENSORS)
            scatter_rows(srcs[j], slot, outs[j], regions[j], deltas[j], rank, num_programs)
        return
    tiles = [_tile(t.size(1), t.element_size()) for t in srcs]
    nprog = max(_programs(num_programs, T, tok) for _, tok in tiles)
    args = []
    for s_, o_, g_, d_ in zip(*(_pad(a, MAX_TENSORS, a[0]) for a in (srcs, outs, regions, deltas))):
        args += [s_, o_, g_, d_, s_.size(1)]
    tk = [v for bt in _pad(tiles, MAX_TENSORS, tiles[0]) for v in (bt[1], bt[0])]
    _scatter_kernel[(nprog,)](
        slot,
        T,
        regions[0].size(0),
        outs[0].size(0),
        *args,
        NT=len(srcs),
        R=slot.size(1),
        ME=rank,
        NPROG=nprog,
        TOK0=tk[0],
        BLOCK0=tk[1],
        TOK1=tk[2],
        BLOCK1=tk[3],
        TOK2=tk[4],
        BLOCK2=tk[5],
        TOK3=tk[6],
        BLOCK3=tk[7],
        num_warps=8,
    )


def copy_out(src, dst, bounds: torch.Tensor, num_programs: int) -> None:
    """``dst[r] = src[r]`` for ``r < bounds[0]`` outside ``[bounds[1], bounds[2])``, ``dst[r] = 0``
    for ``r >= bounds[0]`` (``dst`` ``[N, W]``, ``src`` at least ``N`` rows). ``src`` and ``dst`` may
    be lists of up to :data:`MAX_TENSORS` pairs with the same ``N`` (one launch)."""
    srcs, dsts = ([a] if isinstance(a, torch.Tensor) else list(a) for a in (src, dst))
    N = dsts[0].size(0)
    keep = [i for i, t in enumerate(dsts) if t.size(1) > 0]
    if N == 0 or not keep:
        return
    srcs, dsts = [srcs[i] for i in keep], [dsts[i] for i in keep]
    if len(srcs) > MAX_TENSORS:
        for i in range(0, len(srcs), MAX_TENSORS):
            copy_out(srcs[i : i + MAX_TENSORS], dsts[i : i + MAX_TENSORS], bounds, num_programs)
        return
    tiles = [_tile(t.size(1), t.element_size()) for t in dsts]
    nprog = max(_programs(num_programs, N, tok) for _, tok in tiles)
    args = []
    for s_, d_ in zip(_pad(srcs, MAX_TENSORS, srcs[0]), _pad(dsts, MAX_TENSORS, dsts[0])):
        args += [s_, d_, d_.size(1)]
    tk = [v for bt in _pad(tiles, MAX_TENSORS, tiles[0]) for v in (bt[1], bt[0])]
    _copy_out_kernel[(nprog,)](
        bounds,
        N,
        *args,
        NT=len(dsts),
        NPROG=nprog,
        TOK0=tk[0],
        BLOCK0=tk[1],
        TOK1=tk[2],
        BLOCK1=tk[3],
        TOK2=tk[4],
        BLOCK2=tk[5],
        TOK3=tk[6],
        BLOCK3=tk[7],
        num_warps=8,
    )


def return_blocks(src, table: torch.Tensor, region, delta, rank: int, num_programs: int) -> None:
    """For each ``d != rank``: rows ``table[d, 0] + i`` (``i < table[d, 1]``) of ``src`` to row
    ``table[d, 2] + i`` (``< cap``) of rank ``d``'s copy of ``region`` (as in :func:`scatter_rows`).
    ``src``, ``region`` and ``delta`` may be lists of two (the combined rows and their weights; one
    launch)."""
    srcs, regions, deltas = ([a] if isinstance(a, torch.Tensor) else list(a) for a in (src, region, delta))
    R = table.size(0)
    keep = [i for i, t in enumerate(srcs) if t.size(1) > 0]
    N = srcs[0].size(0)
    if N == 0 or not keep or R < 2:
        return
    srcs, regions, deltas = ([a[i] for i in keep] for a in (srcs, regions, deltas))
    if len(srcs) > 2:
        for i in range(0, len(srcs), 2):
            return_blocks(srcs[i : i + 2], table, regions[i : i + 2], deltas[i : i + 2], rank, num_programs)
        return
    tiles = [_tile(t.size(1), t.element_size()) for t in srcs]
    nprog = max(_programs(num_programs, N, tok) for _, tok in tiles)
    args = []
    for s_, g_, d_ in zip(*(_pad(a, 2, a[0]) for a in (srcs, regions, deltas))):
        args += [s_, g_, d_, s_.size(1)]
    tk = [v for bt in _pad(tiles, 2, tiles[0]) for v in (bt[1], bt[0])]
    _return_kernel[(nprog,)](
        table,
        regions[0].size(0),
        *args,
        NT=len(srcs),
        R=R,
        ME=rank,
        NPROG=nprog,
        TOK0=tk[0],
        BLOCK0=tk[1],
        TOK1=tk[2],
        BLOCK1=tk[3],
        num_warps=8,
    )
