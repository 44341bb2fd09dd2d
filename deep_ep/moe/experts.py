"""The expert math of :class:`~deep_ep.moe.ExpertParallelMoE`: routing, SwiGLU experts over rows grouped by
expert (one ``torch._grouped_mm`` per projection where it applies, a loop elsewhere), their weight
gradients, and the single-process dense reference the tests compare the layer with."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["route_tokens", "dense_moe_reference"]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w_down)


def _gmm(
    x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, counts: Optional[List[int]], grouped: bool
) -> torch.Tensor:
    """Rows grouped by expert (``offs``: int32 ends of each expert's rows) times ``w[e]^T``: ``[P, in]`` x
    ``[L, out, in]`` -> ``[P, out]``. One ``torch._grouped_mm`` when ``grouped``, else a loop over the host
    ``counts``."""
    if grouped:
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offs) if x.size(0) else x.new_zeros((0, w.size(1)))
    parts, s = [], 0
    for e, n in enumerate(counts):
        if n:
            parts.append(x[s : s + n] @ w[e].t())
        s += n
    return torch.cat(parts) if parts else x.new_zeros((0, w.size(1)))


def _gmm_weight_grad(
    dy: torch.Tensor, x: torch.Tensor, offs: torch.Tensor, counts: Optional[List[int]], grouped: bool, L: int
) -> torch.Tensor:
    """The weight gradient of :func:`_gmm`: ``dW[e] = dy_e^T x_e`` -> ``[L, out, in]`` (zero for an expert
    without rows)."""
    if grouped:
        if not x.size(0):
            return x.new_zeros((L, dy.size(1), x.size(1)))
        return torch._grouped_mm(dy.t(), x, offs=offs)
    out = x.new_zeros((L, dy.size(1), x.size(1)))
    s = 0
    for e, n in enumerate(counts):
        if n:
            out[e] = dy[s : s + n].t() @ x[s : s + n]
        s += n
    return out


def _silu_grad(g: torch.Tensor) -> torch.Tensor:
    """d silu(g) / dg."""
    sg = torch.sigmoid(g)
    return sg * (1 + g * (1 - sg))


def route_tokens(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    score_func: str = "softmax",
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing as :class:`ExpertParallelMoE` does it: float32 scores (softmax or sigmoid), the best
    ``topk_group`` of ``n_group`` groups by their best score, top-k, weights from the scores (renormalised
    if asked) times the scaling factor."""
    logits = F.linear(x, router_weight).float()
    scores = logits.softmax(dim=-1) if score_func == "softmax" else logits.sigmoid()
    sel = scores
    if n_group > 1:
        T = x.size(0)
        grouped = scores.view(T, n_group, scores.size(1) // n_group)
        keep = grouped.amax(dim=-1).topk(topk_group, dim=-1).indices
        mask = torch.zeros((T, n_group), dtype=torch.bool, device=x.device).scatter_(1, keep, True)
        sel = grouped.masked_fill(~mask.unsqueeze(-1), float("-inf")).view(T, scores.size(1))
    idx = sel.topk(top_k, dim=-1).indices
    w = scores.gather(1, idx)
    if norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True).clamp(min=1e-20)
    return idx, w * routed_scaling_factor


def dense_moe_reference(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    shared: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """The layer's output computed in one process with every expert local (weights ``[E, 2F, H]`` /
    ``[E, H, F]``), for the given routing: the oracle the tests compare against (differentiable)."""
    T, K = topk_idx.shape
    rows = []
    for t in range(T):
        acc = torch.zeros((x.size(1),), dtype=_acc(x.dtype), device=x.device)
        for k in range(K):
            e = int(topk_idx[t, k])
            acc = acc + topk_weights[t, k].to(acc.dtype) * _swiglu(x[t : t + 1], w_gate_up[e], w_down[e])[0].to(
                acc.dtype
            )
        rows.append(acc)
    y = (torch.stack(rows) if rows else x.new_zeros((0, x.size(1)), dtype=_acc(x.dtype))).to(x.dtype)
    if shared is not None:
        y = y + _swiglu(x, *shared)
    return y
