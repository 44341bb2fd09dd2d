"""Triton kernels of the nvlink transport's device path (``num_worst_tokens`` calls, no host sync).

Each is the twin of a torch function in :mod:`deep_ep.transport.nvlink_device`
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
def _scatter_kernel(src_ptr, slot_ptr, out_ptr, region_ptr, delta_ptr, T, W, CAP, OUT_ROWS,
                    R: tl.constexpr, ME: tl.constexpr, NPROG: tl.constexpr, TOK: tl.constexpr,
                    BLOCK: tl.constexpr):
    pid = tl.program_id(0)
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
def _copy_out_kernel(src_ptr, dst_ptr, bounds_ptr, N, W, NPROG: tl.constexpr, TOK: tl.constexpr,
                     BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    toks = tl.arange(0, TOK)
    n = tl.load(bounds_ptr)
    lo = tl.load(bounds_ptr + 1)
    hi = tl.load(bounds_ptr + 2)
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
def _return_kernel(src_ptr, table_ptr, region_ptr, delta_ptr, W, CAP, R: tl.constexpr, ME: tl.constexpr,
                   NPROG: tl.constexpr, TOK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
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


def _tile(W: int, elem: int):
    """``(BLOCK, TOK)``: words per row piece and rows per step (about 16 KiB per step)."""
    block = max(16 // elem, min(triton.next_power_of_2(max(W, 1)), 4096 // elem))
    tok = max(1, min(64, 16384 // (block * elem)))
    return block, triton.next_power_of_2(tok)


def _programs(num_programs: int, rows: int, tok: int) -> int:
    return max(1, min(int(num_programs), triton.cdiv(max(rows, 1), tok)))


def scatter_rows(src: torch.Tensor, slot: torch.Tensor, out: torch.Tensor, region: torch.Tensor,
                 delta: torch.Tensor, rank: int, num_programs: int) -> None:
    """``src[t]`` to row ``slot[t, d]`` of each destination ``d``: ``out`` for ``d == rank`` (rows
    ``< out.size(0)``), else rank ``d``'s copy of ``region`` (``[cap, W]`` in this rank's symmetric
    buffer; rank ``d``'s starts ``delta[d]`` words away; rows ``< cap``). One integer word dtype."""
    T, W = src.shape
    if T == 0 or W == 0:
        return
    R = slot.size(1)
    block, tok = _tile(W, src.element_size())
    nprog = _programs(num_programs, T, tok)
    _scatter_kernel[(nprog,)](src, slot, out, region, delta, T, W, region.size(0), out.size(0), R=R, ME=rank,
                              NPROG=nprog, TOK=tok, BLOCK=block, num_warps=8)


def copy_out(src: torch.Tensor, dst: torch.Tensor, bounds: torch.Tensor, num_programs: int) -> None:
    """``dst[r] = src[r]`` for ``r < bounds[0]`` outside ``[bounds[1], bounds[2])``, ``dst[r] = 0``
    for ``r >= bounds[0]`` (``dst`` ``[N, W]``, ``src`` at least ``N`` rows)."""
    N, W = dst.shape
    if N == 0 or W == 0:
        return
    block, tok = _tile(W, dst.element_size())
    nprog = _programs(num_programs, N, tok)
    _copy_out_kernel[(nprog,)](src, dst, bounds, N, W, NPROG=nprog, TOK=tok, BLOCK=block, num_warps=8)


def return_blocks(src: torch.Tensor, table: torch.Tensor, region: torch.Tensor, delta: torch.Tensor, rank: int,
                  num_programs: int) -> None:
    """For each ``d != rank``: rows ``table[d, 0] + i`` (``i < table[d, 1]``) of ``src`` to row
    ``table[d, 2] + i`` (``< cap``) of rank ``d``'s copy of ``region`` (as in :func:`scatter_rows`)."""
    N, W = src.shape
    R = table.size(0)
    if N == 0 or W == 0 or R < 2:
        return
    block, tok = _tile(W, src.element_size())
    nprog = _programs(num_programs, N, tok)
    _return_kernel[(nprog,)](src, table, region, delta, W, region.size(0), R=R, ME=rank, NPROG=nprog, TOK=tok,
                             BLOCK=block, num_warps=8)
