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
                       NPROG: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    for t in range(pid, T, NPROG):
        slot = tl.load(slots_ptr + t * slot_stride)
        row = base + slot
        if (slot >= 0) & (row >= lo) & (row < hi):
            src = src_ptr + t.to(tl.int64) * W
            dst = dst_ptr + (row - lo).to(tl.int64) * W
            for c in range(0, W, BLOCK):
                m = (c + cols) < W
                v = tl.load(src + c + cols, mask=m)
                tl.store(dst + c + cols, v, mask=m)


def store_rows(src: torch.Tensor, slots: torch.Tensor, base: int, lo: int, hi: int, dst: torch.Tensor,
               num_programs: int) -> None:
    """For each token ``t`` with ``slots[t] >= 0`` and ``lo <= base + slots[t] < hi``:
    ``dst[base + slots[t] - lo] = src[t]`` (``src`` ``[T, W]`` and ``dst`` ``[rows, W]`` of one dtype)."""
    T, W = src.shape
    if T == 0 or W == 0:
        return
    elem = src.element_size()
    block = max(16 // elem, min(triton.next_power_of_2(W), 4096 // elem))
    nprog = max(1, min(int(num_programs), T))
    _store_rows_kernel[(nprog,)](src, slots, slots.stride(0), dst, T, W, base, lo, hi,
                                 NPROG=nprog, BLOCK=block, num_warps=8)
