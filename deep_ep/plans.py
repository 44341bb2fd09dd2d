"""The plans of fresh dispatches: read on the host (:func:`build_host_plan`), or, for a
``num_worst_tokens`` dispatch on a transport with a device path, built on the device (no host
synchronisation, :func:`build_device_plan`).

A dispatch with ``num_worst_tokens > 0`` on a transport with a device path
(``nvlink``) publishes the same metadata vector as any dispatch (header,
counts, id range, expert counts) into every rank's metadata area, and builds
its plan from the device copy: the counts matrix, ``rank_prefix_matrix`` and
every row's slot (:func:`deep_ep.layout.device_layout`) stay on the device,
the handle's ``num_recv_tokens`` is ``-1``, and the received tensors have
``num_worst_tokens`` rows (padding rows zero, ``topk_idx`` ``-1``). Nothing
waits for the host, so the call can be captured in a CUDA graph.

What the host path checks at once (ranks agree on shapes and dtypes, no rank
receives more than its ``num_worst_tokens``, every expert id lies in
``[-1, num_experts)``) is checked here on the device and reported by
:class:`DeferredChecks` at the Buffer's next call, as a
:class:`~deep_ep.errors.RankMismatchError` or
:class:`~deep_ep.errors.DeepEPInputError`; rows beyond a receiver's
``num_worst_tokens`` are dropped, and so are (token, expert) entries whose id
is out of range (the layout skips them; the receiver sees them as ``-1``).
"""

from __future__ import annotations

import collections
from typing import Any, Deque, List, Optional, Sequence, Tuple

import torch

from . import layout
from .agreement import (
    _H_AUX,
    _H_DTYPE,
    _H_E,
    _H_ERR,
    _H_HIDDEN,
    _H_IDENT,
    _H_K,
    _H_LEVEL,
    _H_MAGIC,
    _H_OP,
    _H_SCALES,
    _H_SEQ,
    _H_W,
    _H_WORST,
    _HEADER,
    _OP_DISPATCH,
    Problem,
    agree_rows,
    check_id_ranges,
    check_rows,
)
from .errors import DeepEPInputError, RankMismatchError
from .kernels.protocol import OUT_HEADERS, OUT_NRECV, OUT_VERDICT
from .streams import ints_to_device
from .transport import Plan

__all__ = [
    "build_host_plan",
    "build_fused_plan",
    "check_worst",
    "row_widths",
    "fused_plan",
    "build_device_plan",
    "DeferredChecks",
    "valid_rows",
    "localize_received",
    "DISPATCH_FIELDS",
]

#: header fields every rank of a dispatch must agree on
_FIELDS = (_H_MAGIC, _H_OP, _H_SEQ, _H_IDENT, _H_AUX, _H_HIDDEN, _H_DTYPE, _H_K, _H_E, _H_SCALES, _H_W, _H_LEVEL)


class DeferredChecks:
    """Device-side verdicts of earlier calls, read on the host once their event has completed.

    Owns a ring of pinned slots: slot ``k`` holds a call's header (copied to the device without a
    host sync) and, back from the device, its verdict. A slot is reused only after its event.
    """

    SLOTS = 64

    def __init__(self) -> None:
        self.pending: Deque[Tuple[torch.cuda.Event, int, int]] = collections.deque()
        self._ring: Optional[torch.Tensor] = None
        self._events: List[Optional[torch.cuda.Event]] = [None] * self.SLOTS
        self._next = 0

    def header_to_device(self, header: List[int], device: torch.device) -> Tuple[torch.Tensor, int]:
        """``(header on the device, slot)``: written into a pinned slot, copied without a host sync."""
        if self._ring is None:
            self._ring = torch.zeros((self.SLOTS, _HEADER + _VERDICTS), dtype=torch.int64).pin_memory()
            self._np = self._ring.numpy()
        k = self._next
        self._next = (k + 1) % self.SLOTS
        ev = self._events[k]
        if ev is not None:
            ev.synchronize()  # that call's copies are done (64 calls ago: never waits)
            self.raise_ready()
        self._np[k, :_HEADER] = header
        return self._ring[k, :_HEADER].to(device, non_blocking=True), k

    def queue(self, verdict: torch.Tensor, seq: int, slot: int) -> None:
        """Queue a verdict already computed on the device (int64 ``[3]``: mismatch, over, bad ids)."""
        self._ring[slot, _HEADER:].copy_(verdict, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._events[slot] = ev
        self.pending.append((ev, slot, seq))

    def raise_ready(self) -> None:
        """Raise for the first completed verdict that found a problem (drops the completed ones)."""
        while self.pending and self.pending[0][0].query():
            _, slot, seq = self.pending.popleft()
            mismatch, over, bad_ids = (int(v) for v in self._np[slot, _HEADER:])
            if mismatch:
                raise RankMismatchError(
                    f"deep_ep: in num_worst_tokens dispatch call #{seq}, the ranks disagreed on the operation, "
                    f"the call number or the shapes / dtypes of x, topk_idx, topk_weights (or a rank rejected "
                    f"its input); its results are garbage. Every rank must make the same calls."
                )
            if over:
                raise DeepEPInputError(
                    f"deep_ep: in num_worst_tokens dispatch call #{seq}, a rank received more tokens than its "
                    f"num_worst_tokens; the rows beyond it were dropped. Raise num_worst_tokens (at most "
                    f"num_ranks * num_tokens)."
                )
            if bad_ids:
                raise DeepEPInputError(
                    f"deep_ep: in num_worst_tokens dispatch call #{seq}, a rank's topk_idx held an expert id "
                    f"outside [-1, num_experts); those (token, expert) entries were dropped (received as -1). "
                    f"Check the router's output on every rank."
                )


#: the deferred verdicts of a device plan: ranks disagree, a rank receives too many rows, bad expert ids
_VERDICTS = 3


def build_device_plan(
    transport,
    checks: DeferredChecks,
    header: List[int],
    payload: Sequence[torch.Tensor],
    is_token_in_rank: torch.Tensor,
    num_tokens: int,
    num_worst_tokens: int,
    seq: int,
    capturing: bool,
) -> Plan:
    """Publish this rank's metadata through ``transport.publish_meta`` and build the plan on the device.

    Under CUDA-graph capture the header is published as zeros (no host memory in the graph; no
    verdict): every rank is capturing then, and a rank that is not reads a garbage header and raises.
    """
    R, me = transport.num_ranks, transport.rank
    device = is_token_in_rank.device
    if capturing:
        head, slot = torch.zeros((_HEADER,), dtype=torch.int64, device=device), -1
    else:
        head, slot = checks.header_to_device(header, device)
    parts = [head] + [p.to(torch.int64).reshape(-1) for p in payload]
    gathered = transport.publish_meta(torch.cat(parts))
    from . import kernels

    if kernels.available(is_token_in_rank):  # one kernel for the layout, prefix matrix and verdict
        from .kernels import plan as kplan

        make = kplan.device_plan
    else:
        from .kernels.twins import device_plan_torch as make
    dl, rpm, verdict = make(is_token_in_rank, gathered, me, _HEADER, _FIELDS, _H_ERR, _H_WORST, _H_E)
    if not capturing:
        checks.queue(verdict, seq, slot)
    plan = Plan(
        rank=me,
        num_ranks=R,
        num_tokens=num_tokens,
        is_token_in_rank=is_token_in_rank,
        rank_prefix_matrix=rpm,
        send_counts=None,
        recv_counts=None,
        num_recv_tokens=-1,
        num_out_rows=num_worst_tokens,
        counts=None,
    )
    plan.device = dl
    return plan


def valid_rows(plan: Plan) -> Optional[torch.Tensor]:
    """bool ``[num_out_rows]``: which received rows are real, for a plan whose count is on the device
    (``None`` when the host knows it)."""
    if plan.num_recv_tokens >= 0:
        return None
    n = plan.device.recv[0]
    return torch.arange(plan.num_out_rows, device=n.device) < n


def localize_received(
    plan: Plan, recv_idx: torch.Tensor, recv_w: Optional[torch.Tensor], rank: int, num_local: int
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The received top-k ids as this rank's local ids (others -1, their weights 0) with the rows past the
    received count (``num_worst_tokens`` padding) set to -1 / 0: one Triton launch when the count is on the
    device (:func:`deep_ep.kernels.plan.localize_rows`), else :func:`deep_ep.layout.localize_topk` and a mask."""
    from . import kernels

    if plan.num_recv_tokens < 0:  # the count is on the device: one launch (or its twin)
        if kernels.available(recv_idx):
            from .kernels import plan as kplan

            return kplan.localize_rows(recv_idx, recv_w, plan.device.recv[:1], rank, num_local)
        from .kernels.twins import localize_rows_torch

        return localize_rows_torch(recv_idx, recv_w, plan.device.recv[:1], rank, num_local)
    idx, w = layout.localize_topk(recv_idx, recv_w, rank, num_local)
    if plan.num_out_rows > plan.num_recv_tokens:
        idx[plan.num_recv_tokens :] = -1
        if w is not None:
            w[plan.num_recv_tokens :] = 0
    return idx, w


#: expert counts a fresh dispatch carries in its metadata exchange on transports without fixed-size slots
#: (num_experts up to this needs no second exchange)
_EXPERT_SLOTS = 256


#: the header fields a fresh dispatch's ranks must agree on, and their names in errors
DISPATCH_FIELDS = (
    (_H_HIDDEN, "hidden size"),
    (_H_DTYPE, "x dtype"),
    (_H_K, "num_topk"),
    (_H_E, "num_experts"),
    (_H_SCALES, "fp8 scale columns"),
    (_H_W, "passing topk_weights"),
    (_H_LEVEL, "compression level"),
)


def check_worst(worst: Sequence[int], received: Sequence[int]) -> None:
    """Raise (the same on every rank) if a rank receives more rows than its ``num_worst_tokens``.

    Args:
        worst: every rank's ``num_worst_tokens`` (0: not given).
        received: the rows every rank receives.
    """
    for d, w in enumerate(worst):
        w = int(w)
        if w > 0 and int(received[d]) > w:
            raise DeepEPInputError(
                f"deep_ep dispatch: rank {d} receives {int(received[d])} tokens but its num_worst_tokens is "
                f"{w}; raise num_worst_tokens there (at most num_ranks * num_tokens). Nothing was sent."
            )


def row_widths(req) -> List[int]:
    """Byte widths of a fresh dispatch's row tensors (x, fp8 scales, top-k ids, weights), as a transport
    sizes its staging for them.

    Args:
        req: a :class:`~deep_ep.calls.DispatchRequest`.

    Returns:
        One width per row tensor the call moves.
    """
    if req.widths is not None:
        return req.widths
    w = [req.x.size(1) * req.x.element_size()] if req.x is not None else [1]
    if req.scales is not None:
        w.append(req.scales.size(1) * 4)
    if req.topk_idx is not None:
        w.append(8 * req.num_topk)
        if req.topk_weights is not None:
            w.append(4 * req.num_topk)
    return w


def build_fused_plan(
    transport, device: torch.device, req, header: List[int], seq: int, wait: bool
) -> Tuple[Plan, int, Optional[List[int]]]:
    """The plan of a fresh dispatch on a transport's fused path: its notify kernel publishes this rank's
    header, counts and expert counts into every rank and computes the plan on the device; the host reads
    the received count (and, when the kernel's verdict is not clean, every rank's header, to name the
    problem as the host path does) from the pinned block the kernel writes: the one host wait.

    Args:
        transport: a transport with :attr:`~deep_ep.transport.base.Transport.fused_plans`.
        device: the Buffer's device.
        req: the call's :class:`~deep_ep.calls.DispatchRequest` (``is_token_in_rank`` and
            ``num_tokens_per_expert`` filled by the layout unless it has a problem).
        header: this rank's header ints (its local verdict included).
        seq: the call's number.
        wait: read the block now; ``False`` (a ``num_worst_tokens`` call that never waits for the host):
            its verdict is read at the next call (``transport.check_deferred``).

    Returns:
        ``(plan, L, expert_list)`` as :func:`build_host_plan` returns them (``expert_list`` empty for a
        call that does not wait). A plan whose rows do not fit the staging has ``fused`` ``None``: it moves
        by the host path, on every rank alike.
    """
    R, problem = transport.num_ranks, req.problem
    E = req.num_experts if req.num_experts > 0 else 0
    if problem is None:
        mask, idx, pe = req.is_token_in_rank, req.topk_idx, req.num_tokens_per_expert
    else:  # this rank still takes part, with no rows and its error in the header
        mask = torch.empty((0, R), dtype=torch.bool, device=device)
        idx = pe = None
        E = 0
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    fl, out, _ = transport.fused_notify(header, mask, idx, pe, E, row_widths(req), wait, capturing, seq)
    plan, expert_list = fused_plan(
        transport, fl, out, mask, problem, E, req.num_worst_tokens, req.expert_alignment, req.topk_idx is not None
    )
    return plan, fl.L, expert_list


def fused_plan(
    transport,
    fl,
    out: Optional[Any],
    mask: torch.Tensor,
    problem: Optional[Problem],
    E: int,
    num_worst_tokens: int,
    expert_alignment: int,
    has_topk: bool,
) -> Tuple[Plan, Optional[List[int]]]:
    """The plan of a fused dispatch from its notify's block (:func:`build_fused_plan`'s second half; a
    Buffer that repeats a call shape calls it after :meth:`fused_notify_run`).

    Args:
        transport: the fused transport; fl: the notify's :class:`~deep_ep.transport.nvlink.fused.FusedLayout`.
        out: the notify's block (int64 numpy), or ``None`` for a call that does not wait (its verdict is read
            at the next call).
        mask: bool ``[T, R]``; problem: this rank's problem, or ``None``; E: experts (0: none, or a problem).
        num_worst_tokens, expert_alignment: the call's; has_topk: the call has top-k ids.

    Returns:
        ``(plan, expert_list)`` (``expert_list`` ``None`` without top-k or with ``num_worst_tokens``, ``[]``
        for a call that does not wait). Raises the host path's errors when the kernel's verdict is not clean.
    """
    R, me = transport.num_ranks, transport.rank
    T = mask.size(0)
    if out is None:
        plan = Plan(
            rank=me,
            num_ranks=R,
            num_tokens=T,
            is_token_in_rank=mask,
            rank_prefix_matrix=fl.rpm,
            send_counts=None,
            recv_counts=None,
            num_recv_tokens=-1,
            num_out_rows=num_worst_tokens,
            fused=fl,
        )
        return plan, []
    hb = OUT_HEADERS
    cb = hb + R * _HEADER
    C = out[cb : cb + R * R].reshape(R, R)
    worsts = out[hb + _H_WORST : cb : _HEADER]
    if problem is not None or out[OUT_VERDICT] or out[OUT_VERDICT + 1] or out[OUT_VERDICT + 2]:
        # the kernel found something (or this rank did): the checks that name it, as on the host path
        check_rows(out[hb:cb].reshape(R, _HEADER).tolist(), _OP_DISPATCH, problem, DISPATCH_FIELDS, me)
        if E > 0:
            lo, hi = out[cb + R * R : cb + R * R + R], out[cb + R * R + R : cb + R * R + 2 * R]
            check_id_ranges(list(zip(lo.tolist(), hi.tolist())), E, me)
        check_worst(worsts, C.sum(axis=0))
    n_recv = int(out[OUT_NRECV])
    expert_list: Optional[List[int]] = None
    if has_topk and num_worst_tokens == 0:
        lb = cb + R * R + 2 * R
        expert_list = out[lb : lb + fl.L].tolist()  # (Python ints)
        if expert_alignment > 1:
            expert_list = layout.aligned_expert_counts(expert_list, expert_alignment)
    fl.counts = C.copy()  # (the ring slot is reused: a copy, numpy for the host, a tensor for the plan)
    plan = Plan(
        rank=me,
        num_ranks=R,
        num_tokens=T,
        is_token_in_rank=mask,
        rank_prefix_matrix=fl.rpm,
        send_counts=C[me].tolist(),
        recv_counts=C[:, me].tolist(),
        num_recv_tokens=n_recv,
        num_out_rows=num_worst_tokens if num_worst_tokens > 0 else n_recv,
        counts=torch.from_numpy(fl.counts),
        fused=None if out[OUT_VERDICT + 3] else fl,  # rows that do not fit an area: the host path (every rank)
    )
    if transport.device_layout and any(worsts.tolist()):
        plan.device = None  # (a fused plan moves rows its own way; the host path reads the counts)
    return plan, expert_list


def build_host_plan(
    transport, device: torch.device, req, header: List[int], payload: Sequence[torch.Tensor], merged: bool
) -> Tuple[Plan, int, Optional[List[int]]]:
    """Agree on the metadata of a fresh dispatch (read on the host: every rank raises the same error for
    bad or mismatched inputs) and build its plan.

    Args:
        transport: the Buffer's transport (its ``all_gather_ints`` carries the exchange).
        device: the Buffer's device.
        req: the call's :class:`~deep_ep.calls.DispatchRequest` (its ``is_token_in_rank`` and
            ``num_tokens_per_expert`` filled by the layout).
        header, payload: this rank's metadata (header ints; counts, id range, expert counts).
        merged: the expert counts travel in this exchange (``transport.fixed_slot_exchange``).

    Returns:
        ``(plan, L, expert_list)``: the plan, local experts per rank, and this rank's received rows per local
        expert rounded to ``expert_alignment`` (``None`` when the call has no top-k or uses
        ``num_worst_tokens``). A plan of a call where any rank passed ``num_worst_tokens`` also gets the
        device layout (those ranks move rows so).
    """
    R, me = transport.num_ranks, transport.rank
    has_device = transport.device_layout
    problem, is_token_in_rank, topk_idx = req.problem, req.is_token_in_rank, req.topk_idx
    T, E, num_worst_tokens = req.num_tokens, req.num_experts, req.num_worst_tokens

    # The header, the counts and the id ranges are read on the host once, as Python ints.
    gathered, g = agree_rows(transport, device, header, payload, problem, DISPATCH_FIELDS, head=_HEADER + R + 2)
    C = [row[_HEADER : _HEADER + R] for row in g]  # C[s][d]: rows s sends to d
    if E > 0:
        check_id_ranges([row[_HEADER + R :] for row in g], E, me)
    recv_totals = [sum(col) for col in zip(*C)]
    worst = [row[_H_WORST] for row in g]
    check_worst(worst, recv_totals)
    expert_list: Optional[List[int]] = None
    L = E // R if E > 0 else 0
    # Expert counts are needed when any rank makes a synchronised call (num_worst_tokens may
    # differ between ranks; the decision must be the same everywhere).
    if topk_idx is not None and 0 in worst:
        if merged or E <= _EXPERT_SLOTS:  # E is the same on every rank here
            pe, first = gathered, _HEADER + R + 2
        else:
            pe = transport.all_gather_ints(req.num_tokens_per_expert.to(torch.int64), "dispatch expert counts")
            first = 0
        if num_worst_tokens == 0:
            mine = pe[:, first + me * L : first + (me + 1) * L].sum(dim=0).tolist()
            expert_list = layout.aligned_expert_counts(mine, req.expert_alignment)
    n_recv = recv_totals[me]
    prefix, acc = [], [0] * R
    for row in C:
        acc = [a + c for a, c in zip(acc, row)]
        prefix.append(acc)
    plan = Plan(
        rank=me,
        num_ranks=R,
        num_tokens=T,
        is_token_in_rank=is_token_in_rank,
        rank_prefix_matrix=ints_to_device(prefix, torch.int32, device),
        send_counts=C[me],
        recv_counts=[row[me] for row in C],
        num_recv_tokens=n_recv,
        num_out_rows=num_worst_tokens if num_worst_tokens > 0 else n_recv,
        counts=torch.tensor(C, dtype=torch.int64),
    )
    if has_device and any(w > 0 for w in worst):
        # Some rank builds its plan on the device: move the rows its way (every rank decides the same).
        plan.device = layout.device_layout(is_token_in_rank, plan.counts.to(device), me)
    return plan, L, expert_list
