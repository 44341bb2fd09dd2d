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
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .. import layout
from ..errors import DeepEPError, DeepEPTimeoutError
from ..settings import Settings

log = logging.getLogger("deep_ep")

#: ``alloc(shape, dtype) -> Tensor``: allocates an output on the stream the caller asked for.
Alloc = Callable[[Tuple[int, ...], torch.dtype], torch.Tensor]


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
    extra: Dict[str, Any] = field(default_factory=dict)  # transport-private state (e.g. send order)


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
    #: programs (SMs) a kernel of this transport may use; set by the Buffer per call from ``Config``
    num_sms: int = 20

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
    def dispatch(self, plan: Plan, rows: Sequence[torch.Tensor], alloc: Alloc) -> List[torch.Tensor]:
        """Send row ``t`` of every tensor in ``rows`` (each ``[T, ...]``, contiguous) to each rank ``j``
        with ``plan.is_token_in_rank[t, j]``.

        Returns one tensor per input, ``[plan.num_out_rows, ...]``, rows grouped by
        source rank ascending then source token ascending; padding rows (beyond
        ``plan.num_recv_tokens``) are zero.
        """

    def dispatch_encoded(
        self, plan: Plan, rows: Sequence[torch.Tensor], alloc: Alloc, codec: Any
    ) -> List[torch.Tensor]:
        """:meth:`dispatch` with ``rows[0]`` (floating ``[T, H]``) travelling in ``codec``'s wire format:
        returns the received rows decoded (``rows[0].dtype``), own rows as ``codec.roundtrip`` of them,
        the other tensors as :meth:`dispatch` does. This default encodes before and decodes after; a
        transport may fuse both into its data path (nvlink)."""
        recv = self.dispatch(plan, [codec.encode(rows[0])] + list(rows[1:]), alloc)
        return [codec.decode(recv[0], rows[0].dtype)] + list(recv[1:])

    @abc.abstractmethod
    def combine(
        self,
        plan: Plan,
        x: torch.Tensor,
        weights: Optional[torch.Tensor],
        biases: Sequence[torch.Tensor],
        alloc: Alloc,
        codec: Any = None,
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


def _canonical_2d(t: torch.Tensor) -> bool:
    """``t`` is 2-D with row-major strides ``(size(1), 1)`` (so any dtype view of its rows is valid)."""
    return t.dim() == 2 and t.stride(1) == 1 and t.stride(0) == t.size(1)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """View ``[N, ...]`` contiguous as ``uint8 [N, row_bytes]``."""
    if _canonical_2d(t):  # the common case: one view
        return t if t.dtype == torch.uint8 else t.view(torch.uint8)
    width = 1
    for d in t.shape[1:]:
        width *= d
    flat = t.reshape(-1)  # stride 1 even where size-1 dims had odd strides
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return flat.view(t.size(0), width * t.element_size())


#: the words rows are copied in, widest first, with their sizes in bytes
_WORDS = ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2))


def gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[idx]`` as ``uint8 [len(idx), row_bytes]``, copying in the widest words the row size allows."""
    if t.size(0) > 0 and _canonical_2d(t):  # view the rows as words directly (no byte view first)
        width = t.size(1) * t.element_size()
        for word, size in _WORDS:
            if width % size == 0:
                w = t if t.dtype == word else t.view(word)
                return w.index_select(0, idx).view(torch.uint8)
    b = as_bytes(t)
    width = b.size(1)
    for word, size in _WORDS:
        if width % size == 0 and b.size(0) > 0:
            return b.view(word).index_select(0, idx).view(torch.uint8)
    return b.index_select(0, idx)


def send_token_order(plan: Plan) -> torch.Tensor:
    """Token index of every sent row (destination-major), cached in the plan."""
    idx = plan.extra.get("send_token_idx")
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
        plan.extra["send_token_idx"] = idx
    return idx


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Combine sums in float32 (float64 for float64 rows, so they lose nothing)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def send_positions(mask: torch.Tensor, counts: Sequence[int], absent: int = -1) -> torch.Tensor:
    """int64 ``[T, K]``: the row of each (token, column) pair in the column-major send order of ``mask``
    (the rows for column 0 first, each column in token order; ``counts[k]`` rows for column ``k``), and
    ``absent`` where ``mask`` is false. The slot of (t, k) is the inclusive count of tokens up to ``t``
    in column ``k``, minus 1, plus the offset of column ``k``'s rows."""
    inclusive = layout.token_cumsum(mask, torch.int64)
    offsets = [-1]
    for c in list(counts)[:-1]:
        offsets.append(offsets[-1] + c)
    base = torch.tensor(offsets, dtype=torch.int64).to(mask.device)
    return torch.where(mask, inclusive + base, torch.full_like(inclusive, absent)).contiguous()


def return_positions(plan: Plan, device: torch.device) -> torch.Tensor:
    """int64 ``[T, R]``: the row of each (token, rank) pair in the destination-major buffer of
    returned rows (``S`` = a zero row where the token did not go to that rank). Cached in the plan."""
    pos = plan.extra.get("return_positions")
    if pos is None:
        pos = plan.extra["return_positions"] = send_positions(
            plan.is_token_in_rank, plan.send_counts, absent=sum(plan.send_counts)
        )
    return pos


def reduce_rows(
    back: torch.Tensor,
    pos: torch.Tensor,
    biases: Sequence[torch.Tensor],
    out_dtype: torch.dtype,
    alloc: Alloc,
    local: Optional[torch.Tensor] = None,
    local_col: int = -1,
    nonnegative: bool = False,
) -> torch.Tensor:
    """Deterministic per-token reduction shared by the transports.

    ``pos`` int64 ``[T, R]`` says where the row of (token, rank ``j``) is:
    a row of ``back`` (the returned rows), or of ``local`` for column
    ``local_col`` (a rank's own rows, read where they are); ``-1`` (or a row
    of zeros) where the token did not go to ``j``. Sums in float32 (float64
    for float64 rows) in ascending rank order, adds each bias, casts to
    ``out_dtype``. Gathers instead of atomics, so the result does not depend
    on scheduling; the Triton kernel (:mod:`deep_ep.kernels.reduce`) does
    the same operations in the same order. ``nonnegative``: the caller
    guarantees that ``pos`` holds no ``-1`` (absent rows point at a zero row),
    so the torch path skips masking.
    """
    acc_dtype = accumulation_dtype(out_dtype)
    T, R = pos.shape
    if R and back.is_cuda:
        from .. import kernels

        if kernels.available(back):
            from ..kernels import reduce as kreduce

            if kreduce.supports(back, biases, out_dtype):
                return kreduce.reduce_rows(
                    back, pos, biases, alloc((T, back.size(1)), out_dtype), local=local, local_col=local_col
                )
    acc = torch.zeros((T, back.size(1)), dtype=acc_dtype, device=back.device) if not R else None
    for j in range(R):
        src = local if j == local_col and local is not None else back
        p = pos[:, j]
        if src.size(0) == 0:
            rows = torch.zeros((T, back.size(1)), dtype=src.dtype, device=back.device)
        elif nonnegative:
            rows = src.index_select(0, p)
        else:
            rows = src.index_select(0, p.clamp(min=0))
            rows = rows.masked_fill((p < 0).unsqueeze(1), 0)
        if acc is None:
            acc = rows.to(acc_dtype)
        else:
            acc.add_(rows)
    for b in biases:
        acc.add_(b)
    if out_dtype == acc_dtype:
        return acc
    out = alloc((T, back.size(1)), out_dtype)
    out.copy_(acc)
    return out


class Waiter:
    """Bounded waits with a diagnosis that names the ranks that did not arrive.

    Nothing is written on the fast path. When a wait expires, this rank
    publishes "gave up at call #n, stage s" in the group's store, gives the
    others a short grace to do the same, and raises
    :class:`~deep_ep.errors.DeepEPTimeoutError` naming the ranks that never
    reported: they did not reach this call. Afterwards the owner is broken.
    """

    def __init__(self, group: dist.ProcessGroup, key_prefix: str, timeout_s: float) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.global_ranks = [
            dist.get_global_rank(group, r) if group is not dist.group.WORLD else r for r in range(self.num_ranks)
        ]
        self.prefix = key_prefix
        self.timeout_s = timeout_s
        self.seq = 0
        self.broken: Optional[str] = None

    def _store(self):
        try:
            from torch.distributed.distributed_c10d import _get_default_store

            return _get_default_store()
        except Exception:  # pragma: no cover - store not reachable
            return None

    def wait(self, work: Any, stage: str) -> None:
        """Wait for a ``torch.distributed`` work object, at most ``timeout_s`` seconds."""
        start = time.monotonic()
        deadline = start + self.timeout_s
        spin_until = start + 2e-3  # spin (yielding) first: metadata waits are usually microseconds
        while not work.is_completed():
            now = time.monotonic()
            if now > deadline:
                self.fail(stage, now - start)
            time.sleep(0 if now < spin_until else 5e-5)
        work.wait()

    def fail(self, stage: str, waited: float) -> None:
        """Publish this rank's timeout, diagnose who is missing and raise."""
        msg_stage = f"call #{self.seq} ({stage})"
        store = self._store()
        arrived: Dict[int, str] = {self.rank: msg_stage}
        if store is not None:
            try:
                store.set(f"{self.prefix}/timeout/{self.rank}", msg_stage)
                grace_end = time.monotonic() + min(2.0, max(self.timeout_s, 0.2))
                while time.monotonic() < grace_end and len(arrived) < self.num_ranks:
                    for r in range(self.num_ranks):
                        if r not in arrived:
                            key = f"{self.prefix}/timeout/{r}"
                            if store.check([key]):
                                arrived[r] = store.get(key).decode()
                    time.sleep(0.02)
            except Exception as e:  # pragma: no cover - diagnosis is best effort
                log.debug("deep_ep timeout diagnosis failed: %s", e)
        missing = [r for r in range(self.num_ranks) if r not in arrived]
        self.broken = f"timed out in {msg_stage}"
        if missing:
            who = ", ".join(str(r) for r in missing)
            detail = (
                f"rank(s) {who} of the group (global rank(s) "
                f"{', '.join(str(self.global_ranks[r]) for r in missing)}) did not arrive"
            )
        else:
            detail = "every rank reported waiting: " + "; ".join(
                f"rank {r} gave up at {arrived[r]}" for r in sorted(arrived)
            )
        raise DeepEPTimeoutError(
            f"deep_ep: rank {self.rank} waited {waited:.1f}s (timeout_s={self.timeout_s:g}) in {msg_stage}; "
            f"{detail}. The Buffer is unusable now; the process group may be too."
        )
