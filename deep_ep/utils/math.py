"""Numeric helpers DeepEP's test scripts import from ``deep_ep.utils.math`` (our implementations).

Everything works on CPU and CUDA tensors and never depends on torch's default
dtype or device.
"""

from __future__ import annotations

from typing import Any, Tuple, Union

import torch

__all__ = [
    "calc_diff",
    "safe_div",
    "ceil_div",
    "align",
    "per_token_cast_to_fp8",
    "per_token_cast_back",
    "inplace_unique",
    "create_grouped_scores",
    "hash_tensor",
    "hash_tensors",
    "count_bytes",
]

#: Largest finite float8_e4m3fn value: a block's absolute maximum maps onto it.
FP8_MAX = 448.0
#: Values per scale factor of the per-token fp8 format.
BLOCK = 128


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """A scale-free distance between two tensors: ``1 - 2<x+1, y+1> / (|x+1|^2 + |y+1|^2)`` in float64.

    0 for equal tensors; about ``|x - y|^2 / (2 |x|^2)`` for nearby ones.

    Args:
        x: any shape.
        y: the same shape.

    Returns:
        A Python float.
    """
    a, b = x.to(torch.float64) + 1, y.to(torch.float64) + 1
    denom = (a * a + b * b).sum()
    return float(1 - 2 * (a * b).sum() / denom)


def safe_div(a: float, b: float) -> float:
    """``a / b``, with ``0 / 0 = 0`` (a non-zero ``a / 0`` still raises ``ZeroDivisionError``).

    Args:
        a: numerator.
        b: denominator.

    Returns:
        The quotient.
    """
    if b == 0 and a == 0:
        return 0
    return a / b


def ceil_div(x: int, y: int) -> int:
    """``x / y`` rounded up (ints).

    Args:
        x: numerator.
        y: positive denominator.

    Returns:
        An int.
    """
    return -(-x // y)


def align(x: int, y: int) -> int:
    """``x`` rounded up to a multiple of ``y`` (ints).

    Args:
        x: value.
        y: positive alignment.

    Returns:
        An int.
    """
    return ceil_div(x, y) * y


def per_token_cast_to_fp8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantise rows to float8_e4m3fn with one float32 scale per 128 values.

    Each block of 128 values (the last one zero-padded) is divided by ``amax / 448`` (``amax`` clamped to
    at least 1e-4), so that dequantised = fp8 value * scale.

    Args:
        x: ``[m, n]`` floating point.

    Returns:
        ``(values float8_e4m3fn [m, n], scales float32 [m, ceil(n / 128)])``.
    """
    if x.dim() != 2:
        raise ValueError(f"per_token_cast_to_fp8 takes a 2-D tensor, got shape {tuple(x.shape)}")
    m, n = x.shape
    blocks = ceil_div(n, BLOCK)
    padded = torch.zeros((m, blocks * BLOCK), dtype=torch.float32, device=x.device)
    padded[:, :n] = x.to(torch.float32)
    view = padded.view(m, blocks, BLOCK)
    amax = view.abs().amax(dim=2).clamp(min=1e-4)
    q = (view * (FP8_MAX / amax).unsqueeze(2)).to(torch.float8_e4m3fn)
    return q.view(m, blocks * BLOCK)[:, :n].contiguous(), (amax / FP8_MAX).contiguous()


def per_token_cast_back(x_fp8: torch.Tensor, x_scales: torch.Tensor) -> torch.Tensor:
    """Dequantise :func:`per_token_cast_to_fp8`'s format to bfloat16.

    Args:
        x_fp8: ``[m, n]`` float8.
        x_scales: float32 ``[m, ceil(n / 128)]`` (any strides), or int32 UE8M0 scales: four power-of-two
            exponents packed per int (byte ``e`` means ``2 ** (e - 127)``), ``[m, ceil(n / 512)]``.

    Returns:
        bfloat16 ``[m, n]``.
    """
    if x_fp8.numel() == 0:
        return torch.zeros(tuple(x_fp8.shape), dtype=torch.bfloat16, device=x_fp8.device)
    m, n = x_fp8.shape
    blocks = ceil_div(n, BLOCK)
    scales = x_scales
    if scales.dtype == torch.int32:
        exps = scales.contiguous().view(torch.uint8).to(torch.int32)  # [m', 4 * cols]
        scales = (exps << 23).view(torch.float32)
    scales = scales.reshape(m, -1)[:, :blocks].to(torch.float32)
    padded = torch.zeros((m, blocks * BLOCK), dtype=torch.float32, device=x_fp8.device)
    padded[:, :n] = x_fp8.to(torch.float32)
    out = padded.view(m, blocks, BLOCK) * scales.unsqueeze(2)
    return out.view(m, blocks * BLOCK)[:, :n].to(torch.bfloat16).contiguous()


def inplace_unique(x: torch.Tensor, num_slots: int) -> None:
    """Replace each row of ``x`` by its distinct non-negative values in descending order, then -1s.

    Args:
        x: int ``[rows, cols]`` with values in ``[-1, num_slots)``; modified in place.
        num_slots: values are below this.
    """
    if x.dim() != 2:
        raise ValueError(f"inplace_unique takes a 2-D tensor, got shape {tuple(x.shape)}")
    present = torch.zeros((x.size(0), num_slots + 1), dtype=torch.bool, device=x.device)
    idx = torch.where(x < 0, torch.full_like(x, num_slots), x).to(torch.int64)
    present.scatter_(1, idx, True)
    present = present[:, :num_slots]
    values = torch.arange(num_slots, dtype=x.dtype, device=x.device).expand(x.size(0), num_slots)
    ranked = torch.where(present, values, torch.full_like(values, -1))
    ranked = torch.sort(ranked, dim=1, descending=True).values
    x.fill_(-1)
    keep = min(num_slots, x.size(1))
    x[:, :keep] = ranked[:, :keep]


def create_grouped_scores(scores: torch.Tensor, group_idx: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Zero the scores of experts outside each token's selected groups.

    Args:
        scores: ``[T, E]``, experts split into ``num_groups`` equal groups.
        group_idx: int64 ``[T, G]`` selected groups per token.
        num_groups: number of groups.

    Returns:
        ``[T, E]`` scores of ``scores.dtype``.
    """
    T, E = scores.shape
    keep = torch.zeros((T, num_groups), dtype=torch.bool, device=scores.device).scatter_(1, group_idx, True)
    keep = keep.unsqueeze(2).expand(T, num_groups, E // num_groups).reshape(T, E)
    return torch.where(keep, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))


def hash_tensor(t: torch.Tensor) -> int:
    """An int that changes with the tensor's bytes (their sum as 32-bit words, or as bytes if fewer).

    Args:
        t: any tensor.

    Returns:
        A Python int.
    """
    raw = t.contiguous().reshape(-1).view(torch.uint8)
    if raw.numel() % 4 == 0:
        return int(raw.view(torch.int32).to(torch.int64).sum())
    return int(raw.to(torch.int64).sum())


def hash_tensors(*tensors: Any) -> int:
    """XOR of :func:`hash_tensor` over tensors (nested tuples and lists included, ``None`` skipped).

    Args:
        tensors: tensors, sequences of them, or ``None``.

    Returns:
        A Python int.
    """
    value = 0
    for t in tensors:
        if isinstance(t, (tuple, list)):
            value ^= hash_tensors(*t)
        elif isinstance(t, torch.Tensor):
            value ^= hash_tensor(t)
    return value


def count_bytes(*tensors: Union[torch.Tensor, Any]) -> int:
    """Bytes of the tensors (nested tuples and lists included, ``None`` skipped).

    Args:
        tensors: tensors, sequences of them, or ``None``.

    Returns:
        A Python int.
    """
    total = 0
    for t in tensors:
        if isinstance(t, (tuple, list)):
            total += count_bytes(*t)
        elif isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total
