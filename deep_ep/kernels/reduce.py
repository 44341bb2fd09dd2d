"""Triton kernel of :func:`deep_ep.rows.reduce_rows` (the combine reduction; torch twin :func:`deep_ep.rows.reduce_rows_torch`).

One program per (token, column block): loads the token's row from each
rank in ascending rank order (from the returned rows, or for one column
from the rank's own rows where they are), sums in float32, adds the biases,
stores the cast result. Same operations in the same order as the torch
path, so the results are bitwise equal; one pass instead of ~2R.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

_SUPPORTED = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _row(back_ptr, loc_ptr, pos_ptr, t, j: tl.constexpr, H, cols, mask, R: tl.constexpr, LOC: tl.constexpr):
    p = tl.load(pos_ptr + t * R + j)
    ok = mask & (p >= 0)
    if j == LOC:
        v = tl.load(loc_ptr + p * H + cols, mask=ok, other=0.0)
    else:
        v = tl.load(back_ptr + p * H + cols, mask=ok, other=0.0)
    return v.to(tl.float32)


@triton.jit
def _reduce_rows_kernel(
    back_ptr,
    loc_ptr,
    pos_ptr,
    b0_ptr,
    b1_ptr,
    out_ptr,
    H,
    R: tl.constexpr,
    LOC: tl.constexpr,
    NB: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    acc = _row(back_ptr, loc_ptr, pos_ptr, t, 0, H, cols, mask, R, LOC)
    for j in tl.static_range(1, R):
        acc += _row(back_ptr, loc_ptr, pos_ptr, t, j, H, cols, mask, R, LOC)
    if NB >= 1:
        acc += tl.load(b0_ptr + t * H + cols, mask=mask, other=0.0).to(tl.float32)
    if NB >= 2:
        acc += tl.load(b1_ptr + t * H + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def supports(back: torch.Tensor, biases: Sequence[torch.Tensor], out_dtype: torch.dtype) -> bool:
    """Whether the kernel handles these dtypes (float64 stays on the torch path)."""
    return back.dtype in _SUPPORTED and out_dtype in _SUPPORTED and all(b.dtype in _SUPPORTED for b in biases)


def reduce_rows(
    back: torch.Tensor,
    pos: torch.Tensor,
    biases: Sequence[torch.Tensor],
    out: torch.Tensor,
    local: Optional[torch.Tensor] = None,
    local_col: int = -1,
) -> torch.Tensor:
    """Write into ``out`` ``[T, H]`` what the torch ``reduce_rows`` returns (see its docstring)."""
    T, R = pos.shape
    H = back.size(1)
    if T == 0 or H == 0:
        return out
    back = back.contiguous() if back.size(0) else out
    if local is None or local_col < 0 or local.size(0) == 0:
        loc = back  # column local_col holds only -1 then (or there is none)
    else:
        loc = local.contiguous()
    pos = pos.contiguous()
    bs = [b.contiguous() for b in biases]
    b0 = bs[0] if len(bs) > 0 else out
    b1 = bs[1] if len(bs) > 1 else out
    block = min(1024, triton.next_power_of_2(H))
    grid = (T, triton.cdiv(H, block))
    _reduce_rows_kernel[grid](
        back,
        loc,
        pos,
        b0,
        b1,
        out,
        H,
        R=R,
        LOC=local_col if local is not None else -1,
        NB=len(bs),
        BLOCK=block,
        num_warps=4,
    )
    return out
