"""Row helpers shared by the transports and the layers above them: byte views, gathers in wide words,
and the deterministic per-token reduction of combine (:func:`reduce_rows`, whose Triton kernel is
:mod:`deep_ep.kernels.reduce`; :func:`reduce_rows_torch` is its torch twin)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

__all__ = [
    "Alloc",
    "as_bytes",
    "gather_rows",
    "accumulation_dtype",
    "reduce_rows",
    "reduce_rows_torch",
]

#: ``alloc(shape, dtype) -> Tensor``: allocates an output on the stream the caller asked for.
Alloc = Callable[[Tuple[int, ...], torch.dtype], torch.Tensor]


def _canonical_2d(t: torch.Tensor) -> bool:
    """``t`` is 2-D with row-major strides ``(size(1), 1)`` (so any dtype view of its rows is valid)."""
    return t.dim() == 2 and t.stride(1) == 1 and t.stride(0) == t.size(1)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """View ``[N, ...]`` contiguous as ``uint8 [N, row_bytes]``."""
    if _canonical_2d(t):  # the common case: one view
        return t if t.dtype == torch.uint8 else t.view(torch.uint8)
    width = 1
    for d in t.shape[1:]:
        width *= d
    flat = t.reshape(-1)  # stride 1 even where size-1 dims had odd strides
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return flat.view(t.size(0), width * t.element_size())


#: the words rows are copied in, widest first, with their sizes in bytes
_WORDS = ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2))


def gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[idx]`` as ``uint8 [len(idx), row_bytes]``, copying in the widest words the row size allows."""
    if t.size(0) > 0 and _canonical_2d(t):  # view the rows as words directly (no byte view first)
        width = t.size(1) * t.element_size()
        for word, size in _WORDS:
            if width % size == 0:
                w = t if t.dtype == word else t.view(word)
                return w.index_select(0, idx).view(torch.uint8)
    b = as_bytes(t)
    width = b.size(1)
    for word, size in _WORDS:
        if width % size == 0 and b.size(0) > 0:
            return b.view(word).index_select(0, idx).view(torch.uint8)
    return b.index_select(0, idx)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Combine sums in float32 (float64 for float64 rows, so they lose nothing)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_rows(
    back: torch.Tensor,
    pos: torch.Tensor,
    biases: Sequence[torch.Tensor],
    out_dtype: torch.dtype,
    alloc: Alloc,
    local: Optional[torch.Tensor] = None,
    local_col: int = -1,
    nonnegative: bool = False,
) -> torch.Tensor:
    """Deterministic per-token reduction shared by the transports.

    ``pos`` int64 ``[T, R]`` says where the row of (token, rank ``j``) is:
    a row of ``back`` (the returned rows), or of ``local`` for column
    ``local_col`` (a rank's own rows, read where they are); ``-1`` (or a row
    of zeros) where the token did not go to ``j``. Sums in float32 (float64
    for float64 rows) in ascending rank order, adds each bias, casts to
    ``out_dtype``. Gathers instead of atomics, so the result does not depend
    on scheduling; the Triton kernel (:mod:`deep_ep.kernels.reduce`) does
    the same operations in the same order. ``nonnegative``: the caller
    guarantees that ``pos`` holds no ``-1`` (absent rows point at a zero row),
    so the torch path skips masking.
    """
    T, R = pos.shape
    if R:
        from . import kernels

        if kernels.available(back):
            from .kernels import reduce as kreduce

            if kreduce.supports(back, biases, out_dtype):
                return kreduce.reduce_rows(
                    back, pos, biases, alloc((T, back.size(1)), out_dtype), local=local, local_col=local_col
                )
    return reduce_rows_torch(back, pos, biases, out_dtype, alloc, local, local_col, nonnegative)


def reduce_rows_torch(
    back: torch.Tensor,
    pos: torch.Tensor,
    biases: Sequence[torch.Tensor],
    out_dtype: torch.dtype,
    alloc: Alloc,
    local: Optional[torch.Tensor] = None,
    local_col: int = -1,
    nonnegative: bool = False,
) -> torch.Tensor:
    """:func:`reduce_rows` in plain torch (any device): the twin of :mod:`deep_ep.kernels.reduce`."""
    acc_dtype = accumulation_dtype(out_dtype)
    T, R = pos.shape
    acc = torch.zeros((T, back.size(1)), dtype=acc_dtype, device=back.device) if not R else None
    for j in range(R):
        src = local if j == local_col and local is not None else back
        p = pos[:, j]
        if src.size(0) == 0:
            rows = torch.zeros((T, back.size(1)), dtype=src.dtype, device=back.device)
        elif nonnegative:
            rows = src.index_select(0, p)
        else:
            rows = src.index_select(0, p.clamp(min=0))
            rows = rows.masked_fill((p < 0).unsqueeze(1), 0)
        if acc is None:
            acc = rows.to(acc_dtype)
        else:
            acc.add_(rows)
    for b in biases:
        acc.add_(b)
    if out_dtype == acc_dtype:
        return acc
    out = alloc((T, back.size(1)), out_dtype)
    out.copy_(acc)
    return out
