"""Reference dispatch and combine in the style of DeepEP V2's ``deep_ep.utils.refs`` (our implementation).

These run real collectives (``torch.distributed`` all-to-all on the default
group, or ``group=``) and plain torch, so a test can compare
:class:`deep_ep.ElasticBuffer` with them on the same ranks. :func:`combine`
is the specification of V2's bit-exact combine order.

Tokens are numbered globally: token ``t`` of rank ``r`` is
``r * num_max_tokens_per_rank + t``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from .envs import get_global_seed

__all__ = ["dispatch", "generate_pre_combine_data", "ordered_accumulate", "combine"]

XType = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def _exchange(rows: torch.Tensor, send: List[int], recv: List[int], group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """All-to-all of ``rows`` (grouped by destination) as raw bytes, so any dtype travels on gloo too."""
    raw = rows.contiguous().view(torch.uint8).reshape(rows.size(0), -1)
    out = torch.empty((sum(recv), raw.size(1)), dtype=torch.uint8, device=rows.device)
    dist.all_to_all_single(out, raw, recv, send, group=group)
    return out.view(rows.dtype).reshape((sum(recv),) + tuple(rows.shape[1:]))


def dispatch(
    x: XType,
    topk_idx: torch.Tensor,
    topk_weights: Optional[torch.Tensor],
    num_max_tokens_per_rank: int,
    num_experts: int,
    group: Optional[dist.ProcessGroup] = None,
):
    """Send each token to every rank owning one of its experts, once per rank (collective).

    Args:
        x: ``[T, H]``, or ``(values [T, H], scale factors [T, S])``.
        topk_idx: int64 ``[T, K]`` global expert ids, -1 for none.
        topk_weights: float32 ``[T, K]`` or ``None``.
        num_max_tokens_per_rank: M, the same on every rank (numbers tokens globally).
        num_experts: E, a multiple of the group size.
        group: the process group (default: the default group).

    Returns:
        ``(recv_x, recv_topk_idx, recv_topk_weights, recv_src_token_idx, num_recv_tokens_per_rank)``: rows
        ordered by source rank then source token; ``recv_topk_idx`` int64 ``[N, K]`` local ids (-1 where the
        expert lives elsewhere); ``recv_topk_weights`` float32 ``[N, K]`` the token's weights as sent (or
        ``None``); ``recv_src_token_idx`` int32 ``[N]`` global token indices; ``num_recv_tokens_per_rank``
        int32 ``[R]``.
    """
    rank, R = dist.get_rank(group), dist.get_world_size(group)
    if num_experts % R != 0:
        raise ValueError(f"num_experts={num_experts} is not a multiple of {R} ranks")
    L = num_experts // R
    values, scales = x if isinstance(x, tuple) else (x, None)
    T, K = topk_idx.shape
    dev = values.device
    owner = torch.where(topk_idx >= 0, topk_idx // L, torch.full_like(topk_idx, -1))
    order, send = [], []
    for d in range(R):
        rows = torch.nonzero((owner == d).any(dim=1)).flatten()
        order.append(rows)
        send.append(int(rows.numel()))
    order_t = torch.cat(order) if order else torch.zeros((0,), dtype=torch.int64, device=dev)
    counts = torch.tensor(send, dtype=torch.int64, device=dev)
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)
    recv = recv_counts.tolist()

    out_x = _exchange(values[order_t], send, recv, group)
    out_sf = _exchange(scales[order_t], send, recv, group) if scales is not None else None
    out_idx = _exchange(topk_idx[order_t], send, recv, group)
    out_w = _exchange(topk_weights[order_t], send, recv, group) if topk_weights is not None else None
    src = (order_t + rank * num_max_tokens_per_rank).to(torch.int32)
    out_src = _exchange(src, send, recv, group)

    lo, hi = rank * L, (rank + 1) * L
    mine = (out_idx >= lo) & (out_idx < hi)
    out_idx = torch.where(mine, out_idx - lo, torch.full_like(out_idx, -1))
    recv_x = (out_x, out_sf) if out_sf is not None else out_x
    return recv_x, out_idx, out_w, out_src, torch.tensor(recv, dtype=torch.int32, device=dev)


def generate_pre_combine_data(
    src_token_global_idx: torch.Tensor, num_max_tokens_per_rank: int, num_topk: int, hidden: int
) -> torch.Tensor:
    """Deterministic "expert outputs" for every (token, k): a function of the token's global index, ``k``,
    the column and the global seed only, so any rank can compute what any other rank will send.

    Args:
        src_token_global_idx: int ``[n]`` global token indices.
        num_max_tokens_per_rank: M (part of V2's signature; the values do not depend on it).
        num_topk: K.
        hidden: H.

    Returns:
        bfloat16 ``[n, K, H]`` with values in [-1, 1].
    """
    dev = src_token_global_idx.device
    ids = src_token_global_idx.to(torch.int64).unsqueeze(1) * num_topk + torch.arange(
        num_topk, dtype=torch.int64, device=dev
    ).unsqueeze(0)
    mixed = (ids * 40503 + 12345 + get_global_seed() * 977) % 65521  # [n, K]
    phase = mixed.to(torch.float64) * (2 * math.pi / 65521)
    cols = torch.arange(1, hidden + 1, dtype=torch.float64, device=dev)
    vals = torch.sin(phase.unsqueeze(2) * (0.37 * cols) + phase.unsqueeze(2))
    return vals.to(torch.float32).to(torch.bfloat16)


def ordered_accumulate(data: torch.Tensor, initial_value: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum ``data`` over its middle axis in order, in float32, starting from ``initial_value``.

    Args:
        data: ``[n, K, H]``.
        initial_value: float32 ``[n, H]`` (not modified), or ``None`` for zeros.

    Returns:
        ``[n, H]`` of ``data.dtype``.
    """
    n, K, H = data.shape
    acc = (
        torch.zeros((n, H), dtype=torch.float32, device=data.device)
        if initial_value is None
        else initial_value.to(torch.float32).clone()
    )
    for k in range(K):
        acc += data[:, k, :].to(torch.float32)
    return acc.to(data.dtype)


def _group_partials(y: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per row: each group's float32 sum over its slots (in slot order), rounded to ``y.dtype``, placed at the
    group's last slot; zeros elsewhere. -1 is a group like any other."""
    n, K, H = y.shape
    out = torch.zeros_like(y)
    for k in range(K):
        closes = ~(groups[:, k + 1 :] == groups[:, k : k + 1]).any(dim=1)
        acc = torch.zeros((n, H), dtype=torch.float32, device=y.device)
        for j in range(k + 1):
            acc += torch.where((groups[:, j] == groups[:, k]).unsqueeze(1), y[:, j, :].to(torch.float32), 0.0)
        out[:, k, :] = torch.where(
            closes.unsqueeze(1), acc.to(y.dtype), torch.zeros((), dtype=y.dtype, device=y.device)
        )
    return out


def combine(
    y: torch.Tensor,
    topk_idx: torch.Tensor,
    num_scaleout_ranks: int,
    num_scaleup_ranks: int,
    num_experts: int,
    bias: Union[torch.Tensor, Sequence[torch.Tensor], None],
    reduce_in_local: bool,
    reduce_in_scaleup: bool,
) -> torch.Tensor:
    """V2's combine result for one rank's tokens, from every (token, k) expert output (local, no communication).

    Optionally the slots of one rank are summed first (``reduce_in_local``), then those of one scale-up
    domain (``reduce_in_scaleup``, needs ``reduce_in_local``); each group's float32 sum is rounded to
    ``y.dtype`` and placed at the group's last slot. Then everything is added in slot order, in float32,
    starting from the bias sum.

    Args:
        y: ``[T, K, H]`` expert outputs per slot (zero where ``topk_idx`` is -1).
        topk_idx: int64 ``[T, K]``.
        num_scaleout_ranks: scale-out domains.
        num_scaleup_ranks: ranks per scale-out domain.
        num_experts: E.
        bias: ``None``, a ``[T, H]`` tensor, or two of them.
        reduce_in_local: sum each rank's slots first.
        reduce_in_scaleup: then each scale-up domain's.

    Returns:
        ``[T, H]`` of ``y.dtype``.
    """
    if reduce_in_scaleup and not reduce_in_local:
        raise ValueError("reduce_in_scaleup needs reduce_in_local")
    R = num_scaleout_ranks * num_scaleup_ranks
    L = num_experts // R
    idx = topk_idx.to(torch.int64)
    if reduce_in_local:
        y = _group_partials(y, torch.div(idx, L, rounding_mode="floor"))
    if reduce_in_scaleup:
        y = _group_partials(y, torch.div(idx, L * num_scaleup_ranks, rounding_mode="floor"))
    start = None
    if bias is not None:
        parts = [bias] if isinstance(bias, torch.Tensor) else list(bias)
        start = parts[0].to(torch.float32)
        for b in parts[1:]:
            start = start + b.to(torch.float32)
    return ordered_accumulate(y, start)
