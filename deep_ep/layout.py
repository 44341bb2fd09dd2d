"""Layout math of dispatch/combine, in plain torch (CPU and CUDA, no host sync unless stated).

This module is the one place where routing (``topk_idx``) is turned into
counts, masks, prefix matrices and slots. Transports and kernels consume its
outputs; kernels that compute the same things on the GPU are tested against
these functions.

Conventions (docs/api.md): ``T`` tokens on this rank, ``K`` top-k, ``E`` experts,
``R`` ranks, ``L = E // R`` experts per rank; expert ``e`` lives on rank
``e // L``; ``-1`` in ``topk_idx`` means "no expert".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from . import kernels
from .config import topk_idx_t
from .errors import DeepEPInputError, DeepEPTypeError

__all__ = [
    "DeviceLayout",
    "device_layout",
    "check_topk_idx",
    "topk_problem",
    "dispatch_layout",
    "dispatch_layout_torch",
    "node_split",
    "rank_prefix_matrix",
    "token_slots",
    "send_order",
    "localize_topk",
    "aligned_expert_counts",
    "num_local_experts",
]


def num_local_experts(num_experts: int, num_ranks: int) -> int:
    """``E // R``, with a clear error when ``num_experts`` is not a positive multiple of ``num_ranks``."""
    if not isinstance(num_experts, int) or num_experts <= 0:
        raise DeepEPInputError(f"num_experts must be a positive int, got {num_experts!r}")
    if num_experts % num_ranks != 0:
        raise DeepEPInputError(
            f"num_experts={num_experts} is not divisible by the number of ranks {num_ranks}; "
            f"every rank must hold the same number of experts"
        )
    return num_experts // num_ranks


def topk_problem(
    topk_idx: torch.Tensor, num_experts: int, *, num_tokens: Optional[int] = None, check_values: bool = True
) -> Optional[str]:
    """Return a message describing what is wrong with ``topk_idx``, or ``None`` if it is valid.

    Checks type, dtype (``topk_idx_t``), rank 2, the number of rows (when
    ``num_tokens`` is given) and, if ``check_values``, that every entry lies in
    ``[-1, num_experts)`` (this reads two numbers back to the host).
    """
    if not isinstance(topk_idx, torch.Tensor):
        return f"topk_idx must be a torch.Tensor, got {type(topk_idx).__name__}"
    if topk_idx.dtype != topk_idx_t:
        return f"topk_idx must have dtype {topk_idx_t} (deep_ep.topk_idx_t), got {topk_idx.dtype}"
    if topk_idx.dim() != 2:
        return f"topk_idx must be 2-D [num_tokens, num_topk], got shape {tuple(topk_idx.shape)}"
    if num_tokens is not None and topk_idx.size(0) != num_tokens:
        return f"topk_idx has {topk_idx.size(0)} rows but x has {num_tokens} tokens"
    if topk_idx.size(1) == 0 and topk_idx.size(0) > 0:
        return "topk_idx has zero columns (num_topk must be >= 1)"
    if check_values and topk_idx.numel() > 0:
        lo, hi = torch.aminmax(topk_idx)
        lo, hi = int(lo), int(hi)
        if lo < -1 or hi >= num_experts:
            bad = lo if lo < -1 else hi
            return (
                f"topk_idx holds expert id {bad}, outside [-1, {num_experts}) "
                f"(num_experts={num_experts}; -1 means no expert)"
            )
    return None


def check_topk_idx(
    topk_idx: torch.Tensor, num_experts: int, *, num_tokens: Optional[int] = None, check_values: bool = True
) -> None:
    """Raise :class:`DeepEPInputError` / :class:`DeepEPTypeError` if ``topk_idx`` is invalid (see :func:`topk_problem`)."""
    msg = topk_problem(topk_idx, num_experts, num_tokens=num_tokens, check_values=check_values)
    if msg is not None:
        if "dtype" in msg or "must be a torch.Tensor" in msg:
            raise DeepEPTypeError(msg)
        raise DeepEPInputError(msg)


def node_split(num_ranks: int, ranks_per_node: Optional[int]) -> Tuple[int, int]:
    """``(nodes, ranks per node)`` of a layout: ``nodes`` 0 when the ranks share one node (``ranks_per_node``
    ``None`` or >= ``num_ranks``); raises :class:`DeepEPInputError` for a bad ``ranks_per_node``."""
    if ranks_per_node is not None and (not isinstance(ranks_per_node, int) or ranks_per_node < 1):
        raise DeepEPInputError(f"ranks_per_node must be an int >= 1, got {ranks_per_node!r}")
    if ranks_per_node is not None and ranks_per_node < num_ranks:
        if num_ranks % ranks_per_node != 0:
            raise DeepEPInputError(f"ranks_per_node={ranks_per_node} does not divide num_ranks={num_ranks}")
        return num_ranks // ranks_per_node, ranks_per_node
    return 0, ranks_per_node or num_ranks


def dispatch_layout(
    topk_idx: torch.Tensor,
    num_experts: int,
    num_ranks: int,
    ranks_per_node: Optional[int] = None,
    no_memset: bool = False,
    use_kernel: Optional[bool] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``get_dispatch_layout`` semantics (docs/api.md, get_dispatch_layout): one Triton launch on CUDA
    (:mod:`deep_ep.kernels.layout`), else :func:`dispatch_layout_torch`.

    Returns ``(num_tokens_per_rank int32 [R], num_tokens_per_node int32 [nodes] or None,
    num_tokens_per_expert int32 [E], is_token_in_rank bool [T, R])``. A token is
    counted once per rank (and once per node) however many of its experts live
    there; ``num_tokens_per_expert`` counts (token, k) pairs, as DeepEP does.
    Entries ``-1`` are ignored, and so is any id outside ``[0, num_experts)``
    (validate with :func:`check_topk_idx`; this function never indexes out
    of bounds). No host synchronisation. ``no_memset``: the kernel's form without the zero fill of its
    totals (the fused nvlink path's; a per-stream scratch and ticket). ``use_kernel``: the caller's
    :func:`deep_ep.kernels.available` of ``topk_idx`` (``None``: asked here).
    """
    num_local_experts(num_experts, num_ranks)  # validates num_experts
    nodes, rpn = node_split(num_ranks, ranks_per_node)
    if use_kernel is None:
        use_kernel = kernels.available(topk_idx)
    if use_kernel:  # the same integers in one launch
        from .kernels import layout as klayout

        return klayout.dispatch_layout(topk_idx, num_experts, num_ranks, nodes, rpn, ticket=no_memset)
    return dispatch_layout_torch(topk_idx, num_experts, num_ranks, ranks_per_node)


def dispatch_layout_torch(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, ranks_per_node: Optional[int] = None
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """:func:`dispatch_layout` in plain torch (any device; the reference of its kernel)."""
    device = topk_idx.device
    num_tokens = topk_idx.size(0)
    L = num_local_experts(num_experts, num_ranks)
    nodes = num_ranks // ranks_per_node if ranks_per_node is not None and ranks_per_node < num_ranks else 0
    # Every invalid entry (-1, or outside [0, num_experts)) goes to bin num_experts, which is dropped:
    # clamp to [-1, E], then -1 -> E (mod E + 1). Bin E lands on the dummy rank column E // L = R.
    binned = topk_idx.clamp(-1, num_experts).remainder(num_experts + 1)
    rank_of = torch.div(binned, L, rounding_mode="floor")
    in_rank = torch.zeros((num_tokens, num_ranks + 1), dtype=torch.bool, device=device)
    in_rank.scatter_(1, rank_of, True)
    is_token_in_rank = in_rank[:, :num_ranks].contiguous()
    num_tokens_per_rank = is_token_in_rank.sum(dim=0, dtype=torch.int32)
    expert_bin = binned.reshape(-1)
    per_expert = torch.zeros((num_experts + 1,), dtype=torch.int32, device=device)
    per_expert.scatter_add_(0, expert_bin, torch.ones_like(expert_bin, dtype=torch.int32))
    num_tokens_per_expert = per_expert[:num_experts]
    num_tokens_per_node = None
    if nodes:
        assert ranks_per_node is not None
        in_node = is_token_in_rank.view(num_tokens, nodes, ranks_per_node).any(dim=2)
        num_tokens_per_node = in_node.sum(dim=0, dtype=torch.int32)
    return num_tokens_per_rank, num_tokens_per_node, num_tokens_per_expert, is_token_in_rank


def rank_prefix_matrix(counts: torch.Tensor) -> torch.Tensor:
    """``[i][j]`` = tokens that ranks ``0..i`` send to rank ``j``, from ``counts[i][j]`` (int32 [R, R])."""
    return torch.cumsum(counts.to(torch.int64), dim=0).to(torch.int32)


def token_cumsum(is_token_in_rank: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inclusive count, per rank, of the tokens up to each that go there: ``[T, R]`` of ``dtype``.

    Scans along the contiguous axis of the transposed mask: on CUDA a scan along dim 0 of a
    ``[T, R]`` tensor with few columns runs one slow sequential kernel (measured ~125 us at
    T = 4096, R = 2 on an H200, against a few us this way). Returns a transposed view.
    """
    return torch.cumsum(is_token_in_rank.t().contiguous(), dim=1, dtype=dtype).t()


def token_slots(is_token_in_rank: torch.Tensor) -> torch.Tensor:
    """Per-destination slot of every token: int32 ``[T, R]``, ``-1`` where the token does not go.

    The slot of token ``t`` at rank ``j`` is the number of tokens before ``t``
    that also go to ``j``; the row it lands in at ``j`` is
    ``rank_prefix_matrix[src - 1][j] + slot`` (0 for ``src == 0``).
    No host synchronisation.
    """
    inclusive = token_cumsum(is_token_in_rank, torch.int32)
    return torch.where(is_token_in_rank, inclusive - 1, -1)


@dataclass(frozen=True)
class DeviceLayout:
    """Where every row of a dispatch goes, on the device (see :func:`device_layout`); all int64.

    Attributes:
        slot: ``[T, R]`` row of token ``t`` among rank ``d``'s received rows, -1 where it does not go.
        send_pos: ``[T, R]`` row of (``t``, ``d``) in this rank's send order, -1 where absent.
        recv: ``[3]`` rows received, first and end row of this rank's own rows among them.
        ret: ``[R, 3]`` per source ``s``: first received row from ``s``, how many, where they start in
            ``s``'s send order.
        combine_pos: ``[T, R]`` ``send_pos`` with column ``rank`` replaced by ``slot``.
    """

    slot: torch.Tensor
    send_pos: torch.Tensor
    recv: torch.Tensor
    ret: torch.Tensor
    combine_pos: torch.Tensor


def device_layout(is_token_in_rank: torch.Tensor, counts: torch.Tensor, rank: int) -> DeviceLayout:
    """Where every row goes, from the token-to-rank mask and the counts matrix, on the device.

    ``counts`` int64 ``[R, R]``: rows rank ``s`` sends to rank ``d`` (on the
    data device). No host synchronisation: this is the layout of a
    ``num_worst_tokens`` dispatch, which must be capturable in a CUDA graph.
    Returns int64 tensors:

    - ``slot`` ``[T, R]``: the row token ``t`` lands in among rank ``d``'s
      received rows (source-major, then token order), ``-1`` where it does not go;
    - ``send_pos`` ``[T, R]``: the row of (``t``, ``d``) in this rank's
      send order (destination-major, then token order), ``-1`` where absent;
    - ``recv`` ``[3]``: rows received, and the first / end row of this
      rank's own rows among them;
    - ``ret`` ``[R, 3]``: for each source ``s``, the first of the rows
      received from ``s``, how many, and where they start in ``s``'s send order
      (so a combine can return them as one block);
    - ``combine_pos`` ``[T, R]``: ``send_pos`` with column ``rank`` replaced by
      ``slot`` (own rows are reduced from the combine input where they are).
    """
    counts = counts.to(torch.int64)
    inclusive = token_cumsum(is_token_in_rank, torch.int64)
    before_src = torch.cumsum(counts, dim=0) - counts  # [s][d]: rows ranks < s send to d
    before_dst = torch.cumsum(counts, dim=1) - counts  # [s][d]: rows s sends to ranks < d
    slot = torch.where(is_token_in_rank, inclusive - 1 + before_src[rank], -1)
    send_pos = torch.where(is_token_in_rank, inclusive - 1 + before_dst[rank], -1)
    own_lo = before_src[rank, rank]
    recv = torch.stack([counts[:, rank].sum(), own_lo, own_lo + counts[rank, rank]])
    ret = torch.stack([before_src[:, rank], counts[:, rank], before_dst[:, rank]], dim=1).contiguous()
    combine_pos = send_pos.clone()
    combine_pos[:, rank] = slot[:, rank]
    return DeviceLayout(
        slot=slot.contiguous(), send_pos=send_pos.contiguous(), recv=recv, ret=ret, combine_pos=combine_pos.contiguous()
    )


def send_order(is_token_in_rank: torch.Tensor) -> torch.Tensor:
    """Token index of each sent row, destination-major then token order: int64 ``[sum of counts]``.

    Rows for rank 0 come first, then rank 1, ...; within a destination, in
    ascending token order (the order the receiver stores them). Synchronises
    with the host on CUDA (the length is data dependent).
    """
    return torch.nonzero(is_token_in_rank.t(), as_tuple=False)[:, 1].contiguous()


def localize_topk(
    topk_idx: torch.Tensor, topk_weights: Optional[torch.Tensor], rank: int, num_local: int
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Rewrite global expert ids to this rank's local ids (``0..L-1``), others to ``-1``.

    Weights of entries that become ``-1`` are set to 0. Returns new tensors.
    """
    lo = rank * num_local
    if num_local > 0:
        # floor(id / L) == rank  <=>  lo <= id < lo + L (also for -1 and out-of-range ids)
        mine = torch.div(topk_idx, num_local, rounding_mode="floor") == rank
    else:
        mine = torch.zeros_like(topk_idx, dtype=torch.bool)
    local = torch.where(mine, topk_idx - lo, -1)
    weights = None
    if topk_weights is not None:
        weights = torch.where(mine, topk_weights, 0.0)
    return local, weights


def aligned_expert_counts(counts: List[int], alignment: int) -> List[int]:
    """Round each count up to a multiple of ``alignment`` (>= 1)."""
    if alignment <= 1:
        return [int(c) for c in counts]
    return [(int(c) + alignment - 1) // alignment * alignment for c in counts]
