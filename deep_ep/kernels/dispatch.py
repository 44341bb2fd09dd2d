"""Triton twin of the nvlink dispatch store (``torch.index_select`` into a peer's staging).

A persistent grid of ``num_programs`` programs walks the tokens; for every
token with a slot at the destination whose row falls in the current window,
it copies the token's row (integer words, contiguous 16-byte vectors) into
the destination region, which may live on a peer GPU (symmetric memory).
Bounding the programs leaves the other SMs free, as DeepEP's ``num_sms``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_rows_kernel(src_ptr, slots_ptr, slot_stride, dst_ptr, T, W, base, lo, hi,
                       NPROG: tl.constexpr, TOK: tl.constexpr, BLOCK: tl.constexpr):
    # TOK tokens per step, each row in BLOCK-word pieces: many independent 16-byte loads and
    # stores in flight per program, which is what keeps NVLink busy with few SMs.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    toks = tl.arange(0, TOK)
    for t0 in range(pid * TOK, T, NPROG * TOK):
        ts = t0 + toks
        inside = ts < T
        slot = tl.load(slots_ptr + ts.to(tl.int64) * slot_stride, mask=inside, other=-1)
        row = base + slot
        ok = inside & (slot >= 0) & (row >= lo) & (row < hi)
        src_rows = src_ptr + ts.to(tl.int64)[:, None] * W
        dst_rows = dst_ptr + (row - lo).to(tl.int64)[:, None] * W
        for c in range(0, W, BLOCK):
            offs = c + cols
            m = ok[:, None] & (offs < W)[None, :]
            v = tl.load(src_rows + offs[None, :], mask=m)
            tl.store(dst_rows + offs[None, :], v, mask=m)


def store_rows(src: torch.Tensor, slots: torch.Tensor, base: int, lo: int, hi: int, dst: torch.Tensor,
               num_programs: int) -> None:
    """For each token ``t`` with ``slots[t] >= 0`` and ``lo <= base + slots[t] < hi``:
    ``dst[base + slots[t] - lo] = src[t]`` (``src`` ``[T, W]`` and ``dst`` ``[rows, W]`` of one dtype)."""
    T, W = src.shape
    if T == 0 or W == 0:
        return
    elem = src.element_size()
    block = max(16 // elem, min(triton.next_power_of_2(W), 4096 // elem))
    tok = 4 if W * elem >= 1024 else 16
    nprog = max(1, min(int(num_programs), triton.cdiv(T, tok)))
    _store_rows_kernel[(nprog,)](src, slots, slots.stride(0), dst, T, W, base, lo, hi,
                                 NPROG=nprog, TOK=tok, BLOCK=block, num_warps=8)
