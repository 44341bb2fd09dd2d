"""``EPHandle``: what :meth:`deep_ep.ElasticBuffer.dispatch` returns for the combine and cached dispatches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch

__all__ = ["EPHandle", "RoutingState"]


@dataclass
class RoutingState:
    """deep_ep's own part of an :class:`EPHandle` (not part of V2's API; may change).

    Attributes:
        owner: id of the ElasticBuffer that made the handle.
        forward: the :class:`deep_ep.Buffer` handle of the rows' dispatch.
        backward_rows: Buffer handle that returns one row per received row to its source rank.
        backward_pairs: Buffer handle that returns the expanded rows to their sources (expanded layout
            without multiple reduction only), else ``None``.
        recv_topk_idx: int64 ``[n, K]`` local expert ids of the received rows (-1: none).
        slot: int64 ``[n, K]`` expanded row of each (row, k) (-1: none), expanded layout only.
        slot_pair: int64 ``[Ne]`` flat (row, k) pair behind each expanded row (-1: padding), expanded only.
        expert_counts: int64 ``[L]`` unaligned (row, k) pairs per local expert.
        row_src_rank: int64 ``[n]`` source rank of each received row (-1: padding).
        home_rows: int64 ``[T, R]`` where rank r's returned row of token t lands at home.
        home_pairs: int64 ``[T, K]`` where the expanded row of (t, k) lands at home (with
            ``backward_pairs``), else ``None``.
        owner_rank: int64 ``[T, K]`` rank of each of this rank's top-k experts (-1: none).
        num_tokens: T.
        num_rows: n, rows of the non-expanded outputs (padding included).
        num_expanded_rows: Ne, rows of the expanded outputs (0 for the non-expanded layout).
        synced: whether the sizes are exact (``do_cpu_sync``) rather than worst case.
    """

    owner: int
    forward: Any
    backward_rows: Any
    backward_pairs: Any
    recv_topk_idx: torch.Tensor
    slot: Optional[torch.Tensor]
    slot_pair: Optional[torch.Tensor]
    expert_counts: torch.Tensor
    row_src_rank: torch.Tensor
    home_rows: torch.Tensor
    home_pairs: Optional[torch.Tensor]
    owner_rank: torch.Tensor
    num_tokens: int
    num_rows: int
    num_expanded_rows: int
    synced: bool


class EPHandle:
    """The routing of one :meth:`deep_ep.ElasticBuffer.dispatch`: pass it to ``combine``, or to ``dispatch``
    (``handle=``) to send other rows along the same routes without recomputing them.

    The attributes are DeepEP V2's (same names and meaning):

    Attributes:
        do_expand: whether the dispatch used the expanded layout (one row per (token, local expert)).
        num_experts: experts of all ranks.
        expert_alignment: every local expert's row count is rounded up to a multiple of this.
        num_max_tokens_per_rank: the per-rank token bound of the dispatch (the same on every rank).
        num_sms: the SM count the dispatch used (a combine with ``num_sms=0`` reuses it).
        topk_idx: int64 ``[T, K]`` the dispatch's top-k ids (a copy with ``do_handle_copy``, else the
            caller's tensor).
        num_recv_tokens: received rows: exact with ``do_cpu_sync``, else the worst case
            ``num_ranks * num_max_tokens_per_rank``.
        num_expanded_tokens: rows of the expanded outputs (exact or worst case, as above).
        num_recv_tokens_per_expert_list: Python list of L ints, each expert's aligned row count (empty
            without ``do_cpu_sync``).
        psum_num_recv_tokens_per_scaleup_rank: int32 ``[num_scaleup_ranks]``, inclusive prefix sum of the
            rows received from each scale-up peer (a token counts once per rank); the last element is the
            number of received rows (read this on the device when outputs are worst-case sized).
        psum_num_recv_tokens_per_expert: int32 ``[L]``: non-expanded, the inclusive prefix sum of the
            aligned counts; expanded, expert ``i``'s first row plus its real count (so
            ``align(psum[i-1], a)`` is its first row and ``psum[i] - align(psum[i-1], a)`` its count).
        num_unaligned_recv_tokens_per_expert: int32 ``[L]`` the real (row, k) count of each local expert.
        recv_src_metadata: int32 ``[num_recv_tokens, K + 2]``: column 0 the source token's global index
            ``src_rank * num_max_tokens_per_rank + src_token``; column 1 ``src_scaleup_rank * K + k0``
            with ``k0`` the first top-k slot naming a local expert; columns 2.. the expanded row of each
            top-k slot (expanded layout; -1 where the slot names no local expert, and everywhere in the
            non-expanded layout). Padding rows are -1.
        dst_buffer_slot_idx: int32 ``[T, K]``: the row each of this rank's (token, k) lands in on the rank
            owning the expert (non-expanded layout), -1 where the id is -1.
        token_metadata_at_forward: ``None`` (V2's hybrid kernels' forwarding state; deep_ep has none).
        channel_linked_list: ``None`` (likewise).
    """

    def __init__(
        self,
        do_expand: bool,
        num_experts: int,
        expert_alignment: int,
        num_max_tokens_per_rank: int,
        num_sms: int,
        topk_idx: torch.Tensor,
        num_recv_tokens: int,
        num_expanded_tokens: int,
        num_recv_tokens_per_expert_list: List[int],
        psum_num_recv_tokens_per_scaleup_rank: torch.Tensor,
        psum_num_recv_tokens_per_expert: torch.Tensor,
        num_unaligned_recv_tokens_per_expert: torch.Tensor,
        recv_src_metadata: torch.Tensor,
        dst_buffer_slot_idx: torch.Tensor,
        token_metadata_at_forward: Optional[torch.Tensor] = None,
        channel_linked_list: Optional[torch.Tensor] = None,
    ) -> None:
        self.do_expand = do_expand
        self.num_experts = num_experts
        self.expert_alignment = expert_alignment
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_sms = num_sms
        self.topk_idx = topk_idx
        self.num_recv_tokens = num_recv_tokens
        self.num_expanded_tokens = num_expanded_tokens
        self.num_recv_tokens_per_expert_list = num_recv_tokens_per_expert_list
        self.psum_num_recv_tokens_per_scaleup_rank = psum_num_recv_tokens_per_scaleup_rank
        self.psum_num_recv_tokens_per_expert = psum_num_recv_tokens_per_expert
        self.num_unaligned_recv_tokens_per_expert = num_unaligned_recv_tokens_per_expert
        self.recv_src_metadata = recv_src_metadata
        self.dst_buffer_slot_idx = dst_buffer_slot_idx
        self.token_metadata_at_forward = token_metadata_at_forward
        self.channel_linked_list = channel_linked_list
        self.cached_recv_src_metadata_before_sort: Optional[torch.Tensor] = None
        self._state: Optional[RoutingState] = None

    def __repr__(self) -> str:
        return (
            f"EPHandle(do_expand={self.do_expand}, num_experts={self.num_experts}, "
            f"expert_alignment={self.expert_alignment}, num_recv_tokens={self.num_recv_tokens}, "
            f"num_expanded_tokens={self.num_expanded_tokens})"
        )
