"""Single-process oracle: what every rank must get from ``dispatch`` and ``combine``.

Takes the inputs of ``R`` simulated ranks and returns each rank's expected
outputs, written from the contract (docs/api.md, dispatch and combine) in the plainest torch,
independently of :mod:`deep_ep.layout` and the transports, so that tests can
compare every transport with it. Everything here is differentiable where the
inputs are floating point, so gradients of the real ops can be checked against
autograd through the oracle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

XType = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]

__all__ = ["RefDispatch", "dispatch", "combine", "expert_rank_mask"]


@dataclass
class RefDispatch:
    """Expected dispatch outputs of one rank.

    ``recv_src_rank`` / ``recv_src_token`` give, for every received row, the
    rank and token index it came from (used by :func:`combine`).
    """

    recv_x: XType
    recv_topk_idx: Optional[torch.Tensor]
    recv_topk_weights: Optional[torch.Tensor]
    num_recv_tokens_per_expert_list: List[int]
    rank_prefix_matrix: torch.Tensor
    recv_src_rank: torch.Tensor
    recv_src_token: torch.Tensor
    num_recv_tokens: int


def expert_rank_mask(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """bool ``[T, R]``: token ``t`` has at least one expert on rank ``r`` (``-1`` ignored)."""
    L = num_experts // num_ranks
    cols = []
    for r in range(num_ranks):
        on_r = (topk_idx >= r * L) & (topk_idx < (r + 1) * L)
        cols.append(
            on_r.any(dim=1) if topk_idx.size(1) > 0 else torch.zeros(topk_idx.size(0), dtype=torch.bool, device="cpu")
        )
    if not cols:
        return torch.zeros((topk_idx.size(0), 0), dtype=torch.bool, device="cpu")
    return torch.stack(cols, dim=1)


def dispatch(
    xs: Sequence[XType],
    topk_idx: Optional[Sequence[torch.Tensor]],
    num_experts: int,
    topk_weights: Optional[Sequence[torch.Tensor]] = None,
    is_token_in_rank: Optional[Sequence[torch.Tensor]] = None,
    expert_alignment: int = 1,
    num_worst_tokens: int = 0,
) -> List[RefDispatch]:
    """Expected ``Buffer.dispatch`` outputs of every rank.

    ``xs[r]`` is rank r's input (a tensor ``[T_r, H]`` or the fp8 pair
    ``(values, scales)``); ``topk_idx[r]`` its ``[T_r, K]`` global expert ids
    (``-1`` = none), or ``None`` together with ``is_token_in_rank`` for a
    dispatch without experts. Rows arrive grouped by source rank ascending,
    then by source token ascending. With ``num_worst_tokens > 0`` the outputs
    are padded to that many rows (``recv_topk_idx`` -1, weights 0, x rows
    zero; only the leading rows are specified) and the list is empty.
    """
    R = len(xs)
    L = num_experts // R if num_experts else 0
    masks = []
    for r in range(R):
        if topk_idx is not None:
            masks.append(expert_rank_mask(topk_idx[r].cpu(), num_experts, R))
        else:
            masks.append(is_token_in_rank[r].cpu().bool())
    counts = torch.tensor(
        [[int(masks[s][:, d].sum()) for d in range(R)] for s in range(R)], dtype=torch.int64, device="cpu"
    )
    prefix = torch.cumsum(counts, dim=0).to(torch.int32)
    out = []
    for d in range(R):
        parts_x, parts_s, parts_idx, parts_w, src_rank, src_tok = [], [], [], [], [], []
        for s in range(R):
            sel = torch.nonzero(masks[s][:, d]).flatten()
            x = xs[s]
            if isinstance(x, tuple):
                parts_x.append(x[0][sel.to(x[0].device)])
                parts_s.append(x[1][sel.to(x[1].device)])
            else:
                parts_x.append(x[sel.to(x.device)])
            if topk_idx is not None:
                g = topk_idx[s][sel.to(topk_idx[s].device)]
                mine = (g >= d * L) & (g < (d + 1) * L)
                parts_idx.append(torch.where(mine, g - d * L, torch.full_like(g, -1)))
                if topk_weights is not None:
                    w = topk_weights[s][sel.to(topk_weights[s].device)]
                    parts_w.append(torch.where(mine, w, torch.zeros_like(w)))
            src_rank.append(torch.full((sel.numel(),), s, dtype=torch.int64, device="cpu"))
            src_tok.append(sel.to(torch.int64))
        recv_x = torch.cat(parts_x, dim=0)
        recv_s = torch.cat(parts_s, dim=0) if parts_s else None
        recv_idx = torch.cat(parts_idx, dim=0) if topk_idx is not None else None
        recv_w = torch.cat(parts_w, dim=0) if parts_w else None
        n = recv_x.size(0)
        if recv_idx is not None:
            per_expert = [int((recv_idx == e).sum()) for e in range(L)]
            a = max(int(expert_alignment), 1)
            per_expert = [(c + a - 1) // a * a for c in per_expert]
        else:
            per_expert = []
        if num_worst_tokens > 0:
            if n > num_worst_tokens:
                raise ValueError(f"rank {d} receives {n} rows > num_worst_tokens={num_worst_tokens}")
            pad = num_worst_tokens - n
            recv_x = torch.cat(
                [recv_x, torch.zeros((pad,) + tuple(recv_x.shape[1:]), dtype=recv_x.dtype, device=recv_x.device)]
            )
            if recv_s is not None:
                recv_s = torch.cat(
                    [recv_s, torch.zeros((pad, recv_s.size(1)), dtype=recv_s.dtype, device=recv_s.device)]
                )
            if recv_idx is not None:
                recv_idx = torch.cat(
                    [recv_idx, torch.full((pad, recv_idx.size(1)), -1, dtype=recv_idx.dtype, device=recv_idx.device)]
                )
            if recv_w is not None:
                recv_w = torch.cat(
                    [recv_w, torch.zeros((pad, recv_w.size(1)), dtype=recv_w.dtype, device=recv_w.device)]
                )
            per_expert = []
        out.append(
            RefDispatch(
                recv_x=(recv_x, recv_s) if recv_s is not None else recv_x,
                recv_topk_idx=recv_idx,
                recv_topk_weights=recv_w,
                num_recv_tokens_per_expert_list=per_expert,
                rank_prefix_matrix=prefix.clone(),
                recv_src_rank=torch.cat(src_rank) if src_rank else torch.zeros(0, dtype=torch.int64, device="cpu"),
                recv_src_token=torch.cat(src_tok) if src_tok else torch.zeros(0, dtype=torch.int64, device="cpu"),
                num_recv_tokens=n,
            )
        )
    return out


def combine(
    ys: Sequence[torch.Tensor],
    dispatched: Sequence[RefDispatch],
    num_tokens: Sequence[int],
    topk_weights: Optional[Sequence[torch.Tensor]] = None,
    biases: Optional[Sequence[Sequence[torch.Tensor]]] = None,
    ranks_per_node: int = 0,
) -> List[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Expected ``Buffer.combine`` outputs of every rank.

    ``ys[d]`` holds rank d's rows, laid out as its ``recv_x`` (extra padding
    rows are ignored). For every token of source rank ``s``: the float32 sum,
    over destination ranks in ascending order, of the rows returned for it,
    then plus each bias (``biases[s]``: 0, 1 or 2 tensors ``[T_s, H]``) in
    order, cast back to the dtype of ``ys`` (float64 rows are summed in float64). ``topk_weights[d]`` (``[N_d, K]``)
    are summed the same way (float32, no bias).

    ``ranks_per_node`` > 0: the hierarchical transport's order instead: per node,
    the sum over its ranks in ascending order, cast to the rows' dtype (weights
    stay float32); then the sum of the nodes' partials in node order.
    """
    R = len(ys)
    out = []
    for s in range(R):
        T = int(num_tokens[s])
        H = ys[0].size(1)
        device = ys[s].device
        acc_dtype = torch.float64 if ys[s].dtype == torch.float64 else torch.float32
        acc = torch.zeros((T, H), dtype=acc_dtype, device=device)
        accw = None
        if topk_weights is not None:
            accw = torch.zeros((T, topk_weights[0].size(1)), dtype=torch.float32, device=device)
        P = ranks_per_node if ranks_per_node > 0 else R
        for first in range(0, R, P):
            part = torch.zeros_like(acc)
            partw = torch.zeros_like(accw) if accw is not None else None
            for d in range(first, first + P):
                n = dispatched[d].num_recv_tokens
                rows = torch.nonzero(dispatched[d].recv_src_rank[:n] == s).flatten()
                tok = dispatched[d].recv_src_token[rows].to(device)
                part = part.index_add(0, tok, ys[d][rows.to(ys[d].device)].to(device).to(acc_dtype))
                if partw is not None:
                    partw = partw.index_add(0, tok, topk_weights[d][rows.to(topk_weights[d].device)].to(device).float())
            if ranks_per_node > 0:
                part = part.to(ys[s].dtype).to(acc_dtype)
            acc = acc + part if ranks_per_node > 0 else part
            if accw is not None:
                accw = accw + partw if ranks_per_node > 0 else partw
        if biases is not None:
            for b in biases[s]:
                acc = acc + b.to(device).to(acc_dtype)
        out.append((acc.to(ys[s].dtype), accw))
    return out


def low_latency_dispatch(
    xs: Sequence[torch.Tensor],
    topk_idx: Sequence[torch.Tensor],
    num_max_dispatch_tokens_per_rank: int,
    num_experts: int,
) -> List[Tuple[torch.Tensor, torch.Tensor, List[Tuple[int, int, int]]]]:
    """Expected low-latency dispatch of every rank: ``(rows float32 [L, R*M, H], counts int32 [L],
    sources)``. Expert ``l``'s valid rows come in source-rank then token order (then ``k``), one per
    (token, selected expert); ``sources[l * R * M + i]`` is ``(src rank, token, k)`` of row ``i`` of
    expert ``l``. Rows are the inputs as given (compare encoded dispatches with their round trip)."""
    R, M = len(xs), num_max_dispatch_tokens_per_rank
    L = num_experts // R
    H = xs[0].size(1) if xs else 0
    out = []
    for d in range(R):
        rows = torch.zeros((L, R * M, H), dtype=torch.float32)
        counts = torch.zeros((L,), dtype=torch.int32)
        sources = [(-1, -1, -1)] * (L * R * M)
        for s in range(R):
            idx = topk_idx[s]
            for t in range(idx.size(0)):
                for k in range(idx.size(1)):
                    e = int(idx[t, k])
                    if e < 0 or e // L != d:
                        continue
                    l = e - d * L
                    i = int(counts[l])
                    rows[l, i] = xs[s][t].float()
                    sources[l * R * M + i] = (s, t, k)
                    counts[l] += 1
        out.append((rows, counts, sources))
    return out


def low_latency_combine(
    ys: Sequence[torch.Tensor], dispatched, topk_idx: Sequence[torch.Tensor], topk_weights: Sequence[torch.Tensor]
) -> List[torch.Tensor]:
    """Expected low-latency combine of every rank: ``out[t] = sum_k w[t, k] * ys[d][l, i]`` in float32
    (``(d, l, i)`` where pair ``(t, k)`` landed; -1 skipped), cast to bf16. ``ys[d]`` ``[L, R*M, H]``."""
    R = len(ys)
    outs = [torch.zeros((idx.size(0), ys[0].size(2)), dtype=torch.float32) for idx in topk_idx]
    for d in range(R):
        L = ys[d].size(0)
        RM = ys[d].size(1)
        _, counts, sources = dispatched[d]
        for l in range(L):
            for i in range(int(counts[l])):
                s, t, k = sources[l * RM + i]
                outs[s][t] += float(topk_weights[s][t, k]) * ys[d][l, i].float()
    return [o.to(torch.bfloat16) for o in outs]
