"""``SparseCollective``: the seed article's sparse all-to-all, on top of :class:`deep_ep.Buffer` (docs/api.md, SparseCollective).

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
from .errors import DeepEPInputError, RankMismatchError, RemoteInputError

__all__ = ["SparseCollective"]

_buffers: Dict[int, Buffer] = {}


def _code(compress: object) -> int:
    """``compress`` (False or a byte ratio) as an int the ranks compare."""
    return 0 if compress is False else int(round(float(compress) * 1e9))


def _agree_rows(rows: List[List[int]], rank: int, problem: Optional[Exception], fields) -> None:
    """Raise on every rank alike: column 0 of ``rows`` is each rank's verdict on its own arguments; the
    ``(column, name)`` in ``fields`` must be the same on every rank."""
    bad = [r for r, row in enumerate(rows) if row[0]]
    if bad:
        if problem is not None:
            problem.args = (f"rank {rank}: {problem.args[0]}",) + tuple(problem.args[1:])
            raise problem
        raise RemoteInputError(
            f"SparseCollective: rank(s) {bad} rejected their arguments; see their errors. Nothing was sent."
        )
    for col, name in fields:
        vals = [row[col] for row in rows]
        if len(set(vals)) > 1:
            raise RankMismatchError(
                f"SparseCollective: ranks disagree on {name} ({', '.join(f'rank {r}: {v}' for r, v in enumerate(vals))}"
                f"); every rank must pass the same"
            )


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
        if group is None:
            group = dist.group.WORLD
        self.group = group
        self.buffer = buffer if buffer is not None else _default_buffer(group)
        R, rank = self.buffer.num_ranks, self.buffer.rank
        # Every argument check happens before the first exchange and travels in it, so a bad argument on
        # one rank makes every rank raise (that rank its own error, the others RemoteInputError) within
        # timeout_s instead of leaving them in a collective.
        problem: Optional[Exception] = None
        route = None
        self.compress: object = False
        try:
            if compression_ratio is not None:
                if (
                    isinstance(compression_ratio, bool)
                    or not isinstance(compression_ratio, (int, float))
                    or not (0 < compression_ratio <= 1)
                ):
                    raise DeepEPInputError(f"compression_ratio must be in (0, 1] or None, got {compression_ratio!r}")
            # 'auto' at that byte ratio (1 = 16-bit rows); the reverse direction stays 16-bit
            self.compress = False if compression_ratio is None or compression_ratio >= 1 else float(compression_ratio)
            if num_experts is not None and (
                isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0
            ):
                raise DeepEPInputError(f"num_experts must be a positive int or None, got {num_experts!r}")
            if not isinstance(route_table, torch.Tensor):
                raise DeepEPInputError(f"route_table must be a tensor, got {type(route_table).__name__}")
            if route_table.dtype.is_floating_point or route_table.dtype == torch.bool:
                raise DeepEPInputError(f"route_table must hold integer expert ids, got {route_table.dtype}")
            if route_table.dim() == 1:
                route_table = route_table.unsqueeze(1)
            if route_table.dim() != 2:
                raise DeepEPInputError(f"route_table must be [N] or [N, K], got shape {tuple(route_table.shape)}")
            route = route_table.to(device=self.buffer.device, dtype=topk_idx_t).contiguous()
            lo = int(route.min()) if route.numel() else -1
            if lo < -1:
                raise DeepEPInputError(f"route_table holds expert id {lo}; ids are >= 0, or -1 for none")
        except DeepEPInputError as e:
            problem = e
        top = int(route.max()) if problem is None and route.numel() else -1
        got = self.buffer.exchange_ints(
            torch.tensor([int(problem is not None), top, num_experts or 0, _code(self.compress)], dtype=torch.int64),
            "SparseCollective arguments",
        ).tolist()
        _agree_rows(got, rank, problem, ((2, "num_experts"), (3, "compression_ratio")))
        if num_experts is None:
            top = max(row[1] for row in got)
            num_experts = max((top + 1 + R - 1) // R * R, R)
        try:
            layout.num_local_experts(num_experts, R)
            layout.check_topk_idx(route, num_experts)
        except DeepEPInputError as e:
            problem = e
        if problem is None:
            per_rank, _, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(route, num_experts)
        else:
            per_rank = torch.zeros((R,), dtype=torch.int32)
        got = self.buffer.exchange_ints(
            torch.cat([torch.tensor([int(problem is not None)]), per_rank.cpu().to(torch.int64)]),
            "SparseCollective traffic",
        )
        _agree_rows(got.tolist(), rank, problem, ())
        self.route_table = route
        self.num_experts = num_experts
        self._layout = (per_rank, per_expert, in_rank)
        self.traffic = got[:, 1:]
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
