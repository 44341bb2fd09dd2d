"""The reductions of :meth:`deep_ep.ElasticBuffer.combine`, in DeepEP V2's order.

V2's combine is bit-reproducible: its documented reference accumulates, per
token, in float32 starting from the bias, the partial sums in the order of
the top-k slots, each group (rank, or scale-up domain in hybrid mode) being
added at the position of its *last* slot, and every partial rounded to the
activation dtype first. These functions compute exactly that, by gathering
rows (no ``[T, K, H]`` tensor is formed) and never reading a device value on
the host.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["last_in_group", "start_value", "local_reduce", "reduce_home_rows", "reduce_home_pairs", "select_weights"]


def last_in_group(groups: torch.Tensor) -> torch.Tensor:
    """Whether slot ``k`` is the last slot of its group in its row.

    Args:
        groups: int64 ``[T, K]`` group id per slot, -1 for slots that belong to none.

    Returns:
        bool ``[T, K]``, False where the group is -1.
    """
    T, K = groups.shape
    same = groups.unsqueeze(2) == groups.unsqueeze(1)  # [T, K, K]
    later = torch.ones((K, K), dtype=torch.bool, device=groups.device).triu(diagonal=1)
    return (groups >= 0) & ~(same & later).any(dim=2)


def start_value(biases: Sequence[torch.Tensor], num_tokens: int, hidden: int, device: torch.device) -> torch.Tensor:
    """The float32 accumulator a combine starts from: the biases' sum (each widened first), or zeros.

    Args:
        biases: 0, 1 or 2 tensors ``[T, H]``.
        num_tokens: T.
        hidden: H.
        device: where the accumulator lives.

    Returns:
        float32 ``[T, H]``.
    """
    if not biases:
        return torch.zeros((num_tokens, hidden), dtype=torch.float32, device=device)
    acc = biases[0].to(torch.float32)
    for b in biases[1:]:
        acc = acc + b.to(torch.float32)
    return acc.clone() if len(biases) == 1 else acc


def _pick(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``rows[index]`` as float32, tolerating an empty ``rows`` (then every index must be masked out)."""
    if rows.size(0) == 0:
        return torch.zeros((index.numel(), rows.size(1)), dtype=torch.float32, device=rows.device)
    return rows.index_select(0, index.clamp(min=0, max=rows.size(0) - 1)).to(torch.float32)


def local_reduce(x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Sum each received row's expanded rows in ``k`` order (float32), rounded to ``x.dtype``.

    Args:
        x: ``[Ne, H]`` expanded rows (expert outputs).
        slot: int64 ``[n, K]`` expanded row of each (received row, k), -1 for none.

    Returns:
        ``[n, H]`` of ``x.dtype``: one partial row per received row.
    """
    n, K = slot.shape
    acc = torch.zeros((n, x.size(1)), dtype=torch.float32, device=x.device)
    for k in range(K):
        s = slot[:, k]
        acc += torch.where((s >= 0).unsqueeze(1), _pick(x, s), 0.0)
    return acc.to(x.dtype)


def reduce_home_rows(
    rows: torch.Tensor,
    positions: torch.Tensor,
    owner: torch.Tensor,
    biases: Sequence[torch.Tensor],
    ranks_per_domain: Optional[int] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Combine one partial row per (token, rank) in V2's order.

    Args:
        rows: ``[m, H]`` rows that came home (one per token and rank that received it, plus padding).
        positions: int64 ``[T, R]`` row of ``rows`` holding rank ``r``'s partial for token ``t``.
        owner: int64 ``[T, K]`` rank of each top-k slot's expert, -1 for none.
        biases: 0, 1 or 2 tensors ``[T, H]``.
        ranks_per_domain: hybrid mode: ranks per scale-up domain; each domain's partials are summed first
            (float32, in slot order) and rounded to the row dtype. ``None``: flat.
        out_dtype: the result dtype (default ``rows.dtype``).

    Returns:
        ``[T, H]`` of ``out_dtype``.
    """
    T, K = owner.shape
    H = rows.size(1)
    dtype = out_dtype or rows.dtype
    acc = start_value(biases, T, H, rows.device)
    if T == 0:
        return acc.to(dtype)
    last_rank = last_in_group(owner)
    safe_owner = owner.clamp(min=0)
    at = positions.gather(1, safe_owner) if positions.numel() else torch.zeros_like(safe_owner)  # [T, K]

    def rank_partial(k: int) -> torch.Tensor:
        return _pick(rows, at[:, k])

    if ranks_per_domain is None:
        for k in range(K):
            acc += torch.where(last_rank[:, k].unsqueeze(1), rank_partial(k), 0.0)
        return acc.to(dtype)

    domain = torch.where(owner >= 0, owner // ranks_per_domain, torch.full_like(owner, -1))
    last_domain = last_in_group(domain)
    for kb in range(K):
        closes = last_domain[:, kb]
        part = torch.zeros((T, H), dtype=torch.float32, device=rows.device)
        for k in range(kb + 1):
            member = closes & last_rank[:, k] & (domain[:, k] == domain[:, kb])
            part += torch.where(member.unsqueeze(1), rank_partial(k), 0.0)
        acc += torch.where(closes.unsqueeze(1), part.to(rows.dtype).to(torch.float32), 0.0)
    return acc.to(dtype)


def reduce_home_pairs(
    rows: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    biases: Sequence[torch.Tensor],
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Combine one row per (token, k) in ``k`` order (V2 without multiple reduction, expanded layout).

    Args:
        rows: ``[m, H]`` rows that came home.
        positions: int64 ``[T, K]`` row of ``rows`` holding slot ``(t, k)``.
        valid: bool ``[T, K]`` slots that name an expert.
        biases: 0, 1 or 2 tensors ``[T, H]``.
        out_dtype: the result dtype (default ``rows.dtype``).

    Returns:
        ``[T, H]`` of ``out_dtype``.
    """
    T, K = valid.shape
    acc = start_value(biases, T, rows.size(1), rows.device)
    for k in range(K):
        acc += torch.where(valid[:, k].unsqueeze(1), _pick(rows, positions[:, k]), 0.0)
    return acc.to(out_dtype or rows.dtype)


def select_weights(rows: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``combined_topk_weights``: slot ``(t, k)`` takes the value the rank owning its expert returned.

    Args:
        rows: float32 ``[m, C]`` weight rows that came home (``C = K`` per rank row, or 1 per pair row).
        positions: int64 ``[T, K]`` row of ``rows`` for each slot.
        valid: bool ``[T, K]`` slots that name an expert (others are 0).

    Returns:
        float32 ``[T, K]``.
    """
    T, K = valid.shape
    if T == 0 or rows.size(0) == 0:
        return torch.zeros((T, K), dtype=torch.float32, device=valid.device)
    picked = rows.index_select(0, positions.clamp(min=0, max=rows.size(0) - 1).reshape(-1)).view(T, K, -1)
    if rows.size(1) == 1:
        vals = picked[:, :, 0]
    else:
        col = torch.arange(K, dtype=torch.int64, device=valid.device).view(1, K, 1).expand(T, K, 1)
        vals = picked.gather(2, col)[:, :, 0]
    return torch.where(valid, vals.to(torch.float32), torch.zeros((), dtype=torch.float32, device=valid.device))
