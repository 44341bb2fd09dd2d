"""Gate scores with a chosen load imbalance, for DeepEP's test scripts (``deep_ep.utils.gate``; our generator).

The imbalance ``ratio`` is: tokens that select at least one expert of rank 0,
divided by the mean of that count over the other ranks. Top-k of the returned
scores gives that ratio approximately (``precise=True``: a finer search).
"""

from __future__ import annotations

from typing import Optional

import torch

from .envs import default_device

__all__ = ["rank_token_counts", "get_scores_with_boost", "get_unbalanced_scores"]


def rank_token_counts(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """Tokens that select at least one expert of each rank.

    Args:
        topk_idx: int64 ``[T, K]`` (-1: none).
        num_experts: E.
        num_ranks: R.

    Returns:
        int64 ``[R]``.
    """
    L = num_experts // num_ranks
    owner = torch.where(topk_idx >= 0, topk_idx // L, torch.full_like(topk_idx, num_ranks))
    hit = torch.zeros((topk_idx.size(0), num_ranks + 1), dtype=torch.bool, device=topk_idx.device)
    hit.scatter_(1, owner.to(torch.int64), True)
    return hit[:, :num_ranks].sum(dim=0)


def get_scores_with_boost(
    num_tokens: int,
    num_experts: int,
    num_ranks: int,
    boost: float,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Uniform scores in [0, 1), with rank 0's experts raised by ``boost``.

    Args:
        num_tokens: T.
        num_experts: E.
        num_ranks: R.
        boost: added to the scores of rank 0's experts (0: balanced).
        generator: random source (on ``device``), or ``None`` for torch's global one.
        device: where the scores live (default: :func:`deep_ep.utils.envs.default_device`).

    Returns:
        float32 ``[T, E]``.
    """
    dev = device if device is not None else default_device()
    scores = torch.rand((num_tokens, num_experts), dtype=torch.float32, device=dev, generator=generator)
    scores[:, : num_experts // num_ranks] += boost
    return scores


def _ratio(scores: torch.Tensor, num_experts: int, num_ranks: int, num_topk: int) -> float:
    idx = torch.topk(scores, num_topk, dim=1).indices
    counts = rank_token_counts(idx, num_experts, num_ranks).to(torch.float64)
    others = counts[1:].mean() if num_ranks > 1 else counts[0]
    return float(counts[0] / others.clamp(min=1))


def get_unbalanced_scores(
    num_tokens: int,
    num_experts: int,
    num_ranks: int,
    num_topk: int,
    ratio: float,
    precise: bool = False,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Gate scores whose top-``num_topk`` sends about ``ratio`` times more tokens to rank 0 than to the others.

    The boost of rank 0's experts is found by bisection on the measured ratio of the same random draw.

    Args:
        num_tokens: T.
        num_experts: E (a multiple of ``num_ranks``).
        num_ranks: R.
        num_topk: K.
        ratio: >= 1; 1 means balanced.
        precise: more bisection steps (closer to ``ratio``).
        device: where the scores live (default: :func:`deep_ep.utils.envs.default_device`).

    Returns:
        float32 ``[T, E]``.
    """
    if ratio < 1.0:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    dev = device if device is not None else default_device()
    base = torch.rand((num_tokens, num_experts), dtype=torch.float32, device=dev)
    if ratio == 1.0 or num_ranks == 1 or num_tokens == 0:
        return base
    L = num_experts // num_ranks
    lo, hi = 0.0, 1.0
    for _ in range(40 if precise else 16):
        mid = (lo + hi) / 2
        trial = base.clone()
        trial[:, :L] += mid
        if _ratio(trial, num_experts, num_ranks, num_topk) < ratio:
            lo = mid
        else:
            hi = mid
    base[:, :L] += hi
    return base
