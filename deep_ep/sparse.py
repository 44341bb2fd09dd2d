"""``SparseCollective``: the seed article's sparse all-to-all, on top of :class:`deep_ep.Buffer` (API.md 6).

::

    route_table = torch.randint(0, num_experts, (batch_size,))   # or [N, K]; -1 = none
    sparse_op = SparseCollective(route_table, num_experts=num_experts)
    expert_inputs = sparse_op.all_to_all(expert_activations)     # rows to the ranks owning their experts
    outputs = sparse_op.reverse(expert_outputs)                  # back to the original row order

Only (source, destination) pairs that carry rows move data. Both directions
are differentiable.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from . import layout, ops
from .buffer import Buffer, DispatchHandle
from .config import topk_idx_t
from .errors import DeepEPInputError

__all__ = ["SparseCollective"]

_buffers: Dict[int, Buffer] = {}


def _default_buffer(group: dist.ProcessGroup) -> Buffer:
    key = id(group)
    buf = _buffers.get(key)
    if buf is None or buf._destroyed:
        buf = _buffers[key] = Buffer(group)
    return buf


class SparseCollective:
    """Sparse all-to-all of rows to the ranks that own their experts, and back.

    Arguments: ``route_table`` ``[N]`` or ``[N, K]`` expert ids (``-1`` =
    none) of this rank's rows; ``num_experts`` (default: the group-wide max
    id + 1 rounded up to a multiple of the group size, agreed by an
    all-reduce); ``compression_ratio`` target wire size relative to 16-bit
    rows (``None`` = 16-bit): rows travel in the ``'auto'`` format
    (:mod:`deep_ep.compress`; every rank must pass the same ratio), the
    reverse direction and gradients in 16 bits; ``group`` (default: the default group);
    ``buffer`` a :class:`Buffer` to reuse (default: one shared Buffer per group).

    Construction is collective (it exchanges the traffic matrix).
    Attributes after construction: ``traffic`` ``[R, R]`` rows sent from
    rank i to rank j, ``density`` = active pairs / R². After
    :meth:`all_to_all`: ``recv_expert_idx`` (local expert ids / -1 of each
    received row), ``num_recv_tokens_per_expert`` and ``handle``.
    """

    def __init__(
        self,
        route_table: torch.Tensor,
        num_experts: Optional[int] = None,
        compression_ratio: Optional[float] = None,
        group: Optional[dist.ProcessGroup] = None,
        *,
        buffer: Optional[Buffer] = None,
    ) -> None:
        if compression_ratio is not None:
            if not isinstance(compression_ratio, (int, float)) or not (0 < compression_ratio <= 1):
                raise DeepEPInputError(f"compression_ratio must be in (0, 1] or None, got {compression_ratio!r}")
        # 'auto' at that byte ratio (1 = 16-bit rows); the reverse direction stays 16-bit
        self.compress = False if compression_ratio is None or compression_ratio >= 1 else float(compression_ratio)
        if group is None:
            group = dist.group.WORLD
        self.group = group
        self.buffer = buffer if buffer is not None else _default_buffer(group)
        R = self.buffer.num_ranks
        if not isinstance(route_table, torch.Tensor):
            raise DeepEPInputError(f"route_table must be a tensor, got {type(route_table).__name__}")
        if route_table.dtype.is_floating_point or route_table.dtype == torch.bool:
            raise DeepEPInputError(f"route_table must hold integer expert ids, got {route_table.dtype}")
        if route_table.dim() == 1:
            route_table = route_table.unsqueeze(1)
        if route_table.dim() != 2:
            raise DeepEPInputError(f"route_table must be [N] or [N, K], got shape {tuple(route_table.shape)}")
        route = route_table.to(device=self.buffer.device, dtype=topk_idx_t).contiguous()
        if num_experts is None:
            top = torch.tensor(
                [int(route.max()) if route.numel() else -1], dtype=torch.int64, device=self.buffer.device
            )
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            num_experts = max((int(top.item()) + 1 + R - 1) // R * R, R)
        layout.num_local_experts(num_experts, R)
        layout.check_topk_idx(route, num_experts)
        self.route_table = route
        self.num_experts = num_experts
        per_rank, _, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(route, num_experts)
        self._layout = (per_rank, per_expert, in_rank)
        self.traffic = self.buffer.exchange_ints(per_rank, "SparseCollective traffic")
        self.density = float((self.traffic > 0).sum()) / float(R * R)
        self.handle: Optional[DispatchHandle] = None
        self.recv_expert_idx: Optional[torch.Tensor] = None
        self.num_recv_tokens_per_expert: Optional[List[int]] = None

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """Send each row of ``x`` ``[N, H]`` once to every rank that owns one of its experts.

        Returns the received rows, grouped by source rank then source row.
        Differentiable (the gradient is a :meth:`reverse` of the gradient).
        """
        per_rank, per_expert, in_rank = self._layout
        recv_x, recv_idx, _, counts, handle = ops._Dispatch.apply(
            self.buffer,
            dict(
                num_tokens_per_rank=per_rank,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert,
                topk_idx=self.route_table,
                compress=self.compress,
            ),
            x,
            None,
        )
        self.handle, self.recv_expert_idx, self.num_recv_tokens_per_expert = handle, recv_idx, counts
        return recv_x

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        """Return rows laid out as :meth:`all_to_all`'s output to their source rows, summed over ranks.

        Weight the rows (e.g. by routing weights) before calling. Differentiable.
        """
        if self.handle is None:
            raise DeepEPInputError("SparseCollective.reverse needs a previous all_to_all")
        return ops.combine(self.buffer, y, self.handle)[0]
