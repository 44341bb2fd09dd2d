"""The transport interface: how rows move between the ranks of a group.

:class:`deep_ep.Buffer` validates inputs, computes the layout
(:mod:`deep_ep.layout`), agrees on metadata with the other ranks and keeps
the handle; a transport only moves bytes. A new transport implements the four
methods of :class:`Transport` and must pass the conformance suite
(``tests/test_conformance.py``) against :mod:`deep_ep.reference`.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .. import layout
from ..errors import DeepEPError
from ..layout import DeviceLayout
from ..rows import Alloc
from ..settings import Settings
from ..streams import ints_to_device
from ..waiting import Waiter

log = logging.getLogger("deep_ep")


def backend_str(group: Optional[dist.ProcessGroup] = None) -> str:
    """The group's backend, lower case; for a group made without naming one (``'undefined'``) its
    per-device configuration (``'cpu:gloo,cuda:nccl'`` where NCCL exists)."""
    be = str(dist.get_backend(group)).lower()
    if be == "undefined":
        try:
            be = str(dist.get_backend_config(group)).lower()
        except Exception:  # pragma: no cover - older torch
            pass
    return be


def group_on_cuda(group: Optional[dist.ProcessGroup] = None) -> bool:
    """True when the group's collectives take CUDA tensors: an NCCL group, or a mixed backend string
    that names one for CUDA (``'cpu:gloo,cuda:gloo'``, ``'cpu:gloo,cuda:nccl'``, or a group made without
    naming a backend on a machine with NCCL)."""
    be = backend_str(group)
    return "nccl" in be or "cuda:" in be


def group_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """The device a group works on: the current CUDA device for a CUDA group (:func:`group_on_cuda`), else CPU."""
    if group_on_cuda(group):
        if not torch.cuda.is_available():
            raise DeepEPError(f"the {dist.get_backend(group)} group needs CUDA")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def one_host(group: dist.ProcessGroup) -> bool:
    """Whether every rank of ``group`` runs on this host (collective: exchanges hostnames)."""
    import socket

    names: List[Optional[str]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(names, socket.gethostname(), group=group)
    return len(set(names)) == 1


@dataclass
class Plan:
    """Everything a transport needs to know about one dispatch layout (kept in the handle).

    Host-side lists are ``None`` when the call must not synchronise with the
    host (a transport that needs them then computes what it needs on the device).
    """

    rank: int
    num_ranks: int
    num_tokens: int
    is_token_in_rank: torch.Tensor  # bool [T, R]
    rank_prefix_matrix: torch.Tensor  # int32 [R, R], on the data device
    send_counts: Optional[List[int]]  # rows this rank sends to each rank
    recv_counts: Optional[List[int]]  # rows this rank receives from each rank
    num_recv_tokens: int  # rows received (-1 if unknown on the host)
    num_out_rows: int  # rows of every received tensor (num_worst_tokens or num_recv_tokens)
    counts: Optional[torch.Tensor] = None  # int64 [R, R] on the CPU: rows rank s sends to rank d
    #: where every row goes, on the device, when the layout lives there (num_worst_tokens dispatches)
    device: Optional[DeviceLayout] = None
    #: token index of every sent row, destination-major (:func:`send_token_order`, made once)
    send_order: Optional[torch.Tensor] = None
    #: row of each (token, rank) pair among the returned rows (:func:`return_positions`, made once)
    return_pos: Optional[torch.Tensor] = None
    #: the fused nvlink path's device plan (:class:`~deep_ep.transport.nvlink.fused.FusedLayout`), or None
    fused: Any = None
    #: what a transport computes once per plan (schedules, views), under keys of its own: a tuple whose
    #: first item is the transport's name
    cache: Dict[Any, Any] = field(default_factory=dict)


class Transport(abc.ABC):
    """Moves rows between the ranks of one process group.

    Methods run with the Buffer's communication stream current (on CUDA) and
    allocate outputs with the ``alloc`` they are given, so the caller's
    ``allocate_on_comm_stream`` choice is honoured.

    Capabilities are class attributes with their defaults here; a transport
    that has one sets it (the Buffer reads them, never ``getattr``):

    - :attr:`fixed_slot_exchange`: :meth:`all_gather_ints` writes into fixed-size
      slots, so vectors of different lengths on different ranks cannot hang it
      (a fresh dispatch then carries the expert counts in its one exchange);
    - :attr:`device_layout`: the transport can move rows by a plan whose layout
      lives on the device (:meth:`publish_meta`; ``num_worst_tokens`` dispatches
      never wait for the host);
    - :attr:`ranks_per_node`: the node size the transport works with (``None``:
      one node), which ``get_dispatch_layout`` reports per node.

    Optional methods (declared here, raising where a transport lacks them):
    :meth:`publish_meta` (with ``device_layout``) and :meth:`low_latency_engine`.
    """

    #: short name, as accepted by ``Buffer(backend=...)``
    name: str = "base"
    #: all_gather_ints writes into fixed-size slots (see the class docstring)
    fixed_slot_exchange: bool = False
    #: plans whose layout lives on the device can be moved (see the class docstring)
    device_layout: bool = False
    #: ranks per node where the transport is node-aware, else None
    ranks_per_node: Optional[int] = None
    #: fresh dispatches plan with one notify kernel and move rows with one data kernel (``fused_notify``,
    #: ``fused_dispatch``, ``fused_combine``; the nvlink transport's fused path)
    fused_plans: bool = False

    def __init__(
        self,
        group: dist.ProcessGroup,
        device: torch.device,
        waiter: "Waiter",
        settings: Settings,
        num_nvl_bytes: int = 0,
    ) -> None:
        """Args:
        group: the process group the rows move in.
        device: where its tensors live (CUDA for an NCCL group, else CPU).
        waiter: the Buffer's bounded-wait helper (timeouts name the missing ranks).
        settings: the Buffer's resolved :class:`~deep_ep.settings.Settings`.
        num_nvl_bytes: staging memory the caller allows (0: the transport's default).
        """
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.device = device
        self.waiter = waiter
        self.settings = settings
        self.timeout_s = settings.timeout_s
        self.num_nvl_bytes = int(num_nvl_bytes)

    @classmethod
    def supported(cls, group: Optional[dist.ProcessGroup] = None) -> Tuple[bool, str]:
        """Whether this transport can serve ``group`` (``None``: a group of every local GPU), and why.

        Returns:
            ``(usable, reason)``; the reason is printed by ``deep-ep info``.
        """
        return True, "no requirements"

    def publish_meta(self, values: torch.Tensor) -> torch.Tensor:
        """Store ``values`` (int64 ``[n]`` on the device) into every rank and return every rank's,
        ``[R, n]`` on the device, without a host sync (transports with :attr:`device_layout` only)."""
        raise NotImplementedError(f"the {self.name} transport has no device-side metadata exchange")

    def fused_notify(self, *args: Any, **kwargs: Any) -> Any:
        """The fused path's notify (transports with :attr:`fused_plans`)."""
        raise NotImplementedError(f"the {self.name} transport has no fused path")

    def fused_notify_statics(self, *args: Any, **kwargs: Any) -> Any:
        """What a notify of one call shape needs beyond its tensors, made once (transports with
        :attr:`fused_plans`; a Buffer keeps it for a signature it repeats)."""
        raise NotImplementedError(f"the {self.name} transport has no fused path")

    def fused_notify_run(self, *args: Any, **kwargs: Any) -> Any:
        """:meth:`fused_notify` with its statics given (transports with :attr:`fused_plans`)."""
        raise NotImplementedError(f"the {self.name} transport has no fused path")

    def fused_dispatch(self, *args: Any, **kwargs: Any) -> Any:
        """The fused path's data kernel (transports with :attr:`fused_plans`)."""
        raise NotImplementedError(f"the {self.name} transport has no fused path")

    def fused_combine(self, *args: Any, **kwargs: Any) -> Any:
        """The fused path's combine (transports with :attr:`fused_plans`)."""
        raise NotImplementedError(f"the {self.name} transport has no fused path")

    def fused_takes_dispatch(self, num_experts: int) -> bool:
        """Whether a fresh dispatch of ``num_experts`` experts (0: no top-k) fits the fused path (the same
        answer on every rank for the same arguments; default: no fused path)."""
        return False

    def fused_takes_combine(self, plan: Plan, x: torch.Tensor, num_topk: int) -> bool:
        """Whether a combine of ``x`` ``[N, H]`` (and ``num_topk`` weights per row) by a fused ``plan`` fits
        the fused path (default: no fused path)."""
        return False

    def check_deferred(self) -> None:
        """Raise the errors that calls which did not wait for the host found since (default: none)."""
        return None

    def low_latency_engine(self, min_bytes: int) -> Any:
        """The transport's low-latency kernel engine (``None``: low-latency calls take the pair dispatch of
        the normal path). ``min_bytes``: staging bytes the caller allows (``num_rdma_bytes``)."""
        return None

    @abc.abstractmethod
    def all_gather_ints(self, values: torch.Tensor, stage: str) -> torch.Tensor:
        """All-gather a small int64 vector (same length on every rank); returns ``[R, n]`` on the CPU.

        Blocks the host, bounded by the timeout (names missing ranks on expiry).
        """

    @abc.abstractmethod
    def dispatch(self, plan: Plan, rows: Sequence[torch.Tensor], alloc: Alloc, num_sms: int = 20) -> List[torch.Tensor]:
        """Send row ``t`` of every tensor in ``rows`` (each ``[T, ...]``, contiguous) to each rank ``j``
        with ``plan.is_token_in_rank[t, j]``.

        Returns one tensor per input, ``[plan.num_out_rows, ...]``, rows grouped by
        source rank ascending then source token ascending; padding rows (beyond
        ``plan.num_recv_tokens``) are zero.
        """

    def dispatch_encoded(
        self, plan: Plan, rows: Sequence[torch.Tensor], alloc: Alloc, codec: Any, num_sms: int = 20
    ) -> List[torch.Tensor]:
        """:meth:`dispatch` with ``rows[0]`` (floating ``[T, H]``) travelling in ``codec``'s wire format:
        returns the received rows decoded (``rows[0].dtype``), own rows as ``codec.roundtrip`` of them,
        the other tensors as :meth:`dispatch` does. This default encodes before and decodes after; a
        transport may fuse both into its data path (nvlink).

        The encoded rows are temporaries of the current (comm) stream, not made with ``alloc``: memory
        allocated on the compute stream and freed while the decode is still queued on the comm stream
        could be handed to the compute stream's next allocation (``async_finish``)."""
        x = rows[0]
        recv = self.dispatch(plan, [codec.encode(x)] + list(rows[1:]), self.stream_alloc, num_sms=num_sms)
        out = alloc((recv[0].size(0), x.size(1)), x.dtype)
        return [codec.decode(recv[0], x.dtype, out=out)] + list(recv[1:])

    def stream_alloc(self, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An :data:`~deep_ep.rows.Alloc` on the current stream (for a call's temporaries)."""
        return torch.empty(shape, dtype=dtype, device=self.device)

    @abc.abstractmethod
    def combine(
        self,
        plan: Plan,
        x: torch.Tensor,
        weights: Optional[torch.Tensor],
        biases: Sequence[torch.Tensor],
        alloc: Alloc,
        codec: Any = None,
        num_sms: int = 20,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Reverse of :meth:`dispatch` with a reduction.

        ``codec`` (a :class:`deep_ep.compress.Codec`, or ``None``): the rows of ``x``
        travel encoded and are decoded before the reduction; a rank's own rows are
        reduced as ``codec.roundtrip`` of them, so the result does not depend on
        where a row was.

        ``x`` ``[num_out_rows or num_recv_tokens, H]`` is laid out as the received rows.
        Returns ``[T, H]`` in ``x.dtype``: for each token, the float32 sum over
        ranks in ascending order of its returned rows, plus each bias in order;
        and ``weights`` (``[N, K]`` float32) summed the same way, or ``None``.
        """

    def destroy(self) -> None:  # noqa: B027 - optional hook  # pragma: no cover - default no-op
        """Release transport resources."""
        return None


def alloc_outputs(plan: Plan, rows: Sequence[torch.Tensor], alloc: Alloc) -> List[torch.Tensor]:
    """One received tensor per row tensor, ``[plan.num_out_rows, ...]``, padding rows zeroed."""
    outs = []
    for t in rows:
        o = alloc((plan.num_out_rows,) + tuple(t.shape[1:]), t.dtype)
        if plan.num_out_rows > plan.num_recv_tokens:
            o[plan.num_recv_tokens :].zero_()
        outs.append(o)
    return outs


def send_token_order(plan: Plan) -> torch.Tensor:
    """Token index of every sent row (destination-major), cached in the plan."""
    idx = plan.send_order
    if idx is None:
        idx = None
        if plan.is_token_in_rank.is_cuda and hasattr(torch, "nonzero_static"):
            mask_t = plan.is_token_in_rank.t()
            total = sum(plan.send_counts)
            try:  # no host sync: the length is known from the counts
                idx = torch.nonzero_static(mask_t, size=total)[:, 1].contiguous()
            except (NotImplementedError, RuntimeError):
                idx = None
        if idx is None:
            idx = layout.send_order(plan.is_token_in_rank)
        plan.send_order = idx
    return idx


def send_positions(mask: torch.Tensor, counts: Sequence[int], absent: int = -1) -> torch.Tensor:
    """int64 ``[T, K]``: the row of each (token, column) pair in the column-major send order of ``mask``
    (the rows for column 0 first, each column in token order; ``counts[k]`` rows for column ``k``), and
    ``absent`` where ``mask`` is false. The slot of (t, k) is the inclusive count of tokens up to ``t``
    in column ``k``, minus 1, plus the offset of column ``k``'s rows."""
    inclusive = layout.token_cumsum(mask, torch.int64)
    offsets = [-1]
    for c in list(counts)[:-1]:
        offsets.append(offsets[-1] + c)
    base = ints_to_device(offsets, torch.int64, mask.device)
    return torch.where(mask, inclusive + base, torch.full_like(inclusive, absent)).contiguous()


def return_positions(plan: Plan, device: torch.device) -> torch.Tensor:
    """int64 ``[T, R]``: the row of each (token, rank) pair in the destination-major buffer of
    returned rows (``S`` = a zero row where the token did not go to that rank). Cached in the plan."""
    pos = plan.return_pos
    if pos is None:
        pos = plan.return_pos = send_positions(plan.is_token_in_rank, plan.send_counts, absent=sum(plan.send_counts))
    return pos
