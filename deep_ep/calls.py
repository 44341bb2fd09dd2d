"""The typed requests a Buffer call flows as: validated arguments -> header -> plan -> rows moved.

``Buffer.dispatch`` / ``combine`` parse their arguments into a :class:`DispatchRequest`,
:class:`CachedDispatchRequest` or :class:`CombineRequest`. Parsing never raises for a caller's bad
argument: it records a :class:`~deep_ep.agreement.Problem`, which travels through the ranks'
metadata agreement so that every rank raises at once (the bad rank its precise error, the others
:class:`~deep_ep.errors.RemoteInputError`) and no rank is left waiting. The request then gives the
call's metadata header (:meth:`DispatchRequest.header`), the plan is built from it
(:mod:`deep_ep.plans`), and the transport moves the request's rows (:meth:`DispatchRequest.rows`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

import torch

from . import validate
from .agreement import _H_IDENT, _H_SEQ, _OP_CACHED, _OP_COMBINE, _OP_DISPATCH, Problem, make_header
from .caches import LIMIT, keep
from .codecs import Codec
from .config import Config, EventOverlap
from .errors import DeepEPInputError, DeepEPTypeError
from .wire import Wire

__all__ = [
    "DispatchRequest",
    "CachedDispatchRequest",
    "CombineRequest",
    "CallOptions",
    "parse_call_options",
    "tensor_signature",
    "ParseCache",
]


def tensor_signature(t: Any) -> Any:
    """What parsing a call's argument depends on: ``(shape, dtype, device)`` of a plain contiguous tensor,
    ``None`` for ``None``, and ``False`` for anything else, a non-contiguous tensor included (never cached:
    see :class:`ParseCache`; parsing makes such a tensor contiguous, a cached call would not)."""
    if t is None:
        return None
    if type(t) is torch.Tensor and t.is_contiguous():
        return (t.shape, t.dtype, t.device)
    return False


class ParseCache:
    """Parsed requests of eager calls, by their arguments' signature (:func:`tensor_signature` of each tensor,
    the exact type and value of each other argument): a call whose signature was parsed before without a
    problem reuses that request with its own tensors (parsing depends on nothing else: shapes, dtypes,
    devices; every value check is the kernels' or the agreement's), so validation costs once per
    signature, as a kernel's compilation does. A kept request holds no tensor (the first call's would stay
    alive). Bounded: cleared when it holds ``limit`` signatures.

    Args:
        limit: signatures kept at most.
    """

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self._kept: dict = {}

    def get(self, key: Any) -> Any:
        """The request parsed for ``key``, or ``None``."""
        return self._kept.get(key)

    @staticmethod
    def cacheable(key: Any) -> bool:
        """Whether ``key`` may be kept: no argument that is not a plain contiguous tensor (``False``)."""
        return not any(v is False for v in key)

    def put(self, key: Any, req: Any) -> None:
        """Keep ``req`` (parsed without a problem, its tensors dropped) for a :meth:`cacheable` ``key``."""
        if req.problem is not None or not self.cacheable(key):
            return
        keep(self._kept, key, req, self.limit)


@dataclass
class CallOptions:
    """The stream and kernel options every call takes (``config``, events), validated.

    Attributes:
        num_sms: programs (SMs) the call's kernels may use (``config.num_sms``, else ``Buffer.num_sms``).
        previous_event: the event the comm stream waits for instead of the current stream, or ``None``.
        async_finish: return an event instead of making the current stream wait.
        allocate_on_comm_stream: allocate outputs on the comm stream.
    """

    num_sms: int
    previous_event: Optional[EventOverlap] = None
    async_finish: bool = False
    allocate_on_comm_stream: bool = False


def parse_call_options(
    config: Any, previous_event: Any, async_finish: Any, allocate_on_comm_stream: Any, default_sms: int
) -> Tuple[CallOptions, Optional[Problem]]:
    """Validate the options every call takes; a bad one is returned as a :class:`Problem` (code 7) with
    safe defaults in its place, so the call still joins the agreement.

    Returns:
        ``(options, problem or None)``.
    """
    problem = None
    num_sms = default_sms
    try:
        if config is not None and not isinstance(config, Config):
            raise Problem(7, DeepEPTypeError(f"config must be a deep_ep.Config, got {type(config).__name__}"))
        if config is not None:
            num_sms = config.num_sms
        if previous_event is not None and not isinstance(previous_event, EventOverlap):
            raise Problem(
                7, DeepEPTypeError(f"previous_event must be an EventOverlap, got {type(previous_event).__name__}")
            )
        if allocate_on_comm_stream and not (previous_event is not None and async_finish):
            raise Problem(
                7, DeepEPInputError("allocate_on_comm_stream=True requires previous_event and async_finish=True")
            )
    except Problem as p:
        return CallOptions(num_sms), p
    return CallOptions(num_sms, previous_event, bool(async_finish), bool(allocate_on_comm_stream)), problem


@dataclass
class DispatchRequest:
    """A fresh dispatch, validated (docs/api.md, dispatch). ``-1`` in a size means "unknown" (bad input).

    Attributes:
        x: the token rows ``[T, H]`` (floating, or fp8 values of a pair), contiguous, or ``None``.
        scales: float32 ``[T, H // 128]`` of an fp8 pair, or ``None``.
        topk_idx: int64 ``[T, K]`` global expert ids (-1 = none), or ``None``.
        topk_weights: float32 ``[T, K]``, or ``None``.
        is_token_in_rank: bool ``[T, R]`` when given by the caller (else the layout computes it).
        num_tokens_per_expert: int ``[E]`` (gives ``E``), or ``None``.
        num_tokens, hidden, num_topk, num_experts: ``T``, ``H``, ``K``, ``E``.
        num_worst_tokens: rows of every received tensor when > 0 (no host sync where the transport can).
        expert_alignment: the per-expert counts are rounded up to it.
        codec: the wire codec of ``x`` (``None``: rows travel as they are).
        tolerance: ``'auto'``'s per-row error bound for this call, or ``None``.
        return_compressed: hand ``recv_x`` over encoded.
        options: the call's :class:`CallOptions`.
        problem: the first bad argument found, or ``None``.
        aux: settings the call's ranks must share beyond its shapes (a low-latency call's), or 0.
        header_base: the header with call number and identity 0, kept by a request that a
            :class:`ParseCache` holds (its copies then build their header from it), else ``None``.
        widths: the row byte widths (:func:`deep_ep.plans.row_widths`) kept the same way, else ``None``.
        lane: the transport's notify statics of the call shape, kept the same way when the call takes the
            fused path (``Buffer`` then runs it without the general path's steps), else ``None``.
    """

    x: Optional[torch.Tensor] = None
    scales: Optional[torch.Tensor] = None
    topk_idx: Optional[torch.Tensor] = None
    topk_weights: Optional[torch.Tensor] = None
    is_token_in_rank: Optional[torch.Tensor] = None
    num_tokens_per_expert: Optional[torch.Tensor] = None
    num_tokens: int = -1
    hidden: int = -1
    num_topk: int = -1
    num_experts: int = -1
    num_worst_tokens: int = 0
    expert_alignment: int = 1
    codec: Optional[Codec] = None
    tolerance: Optional[float] = None
    return_compressed: bool = False
    options: CallOptions = field(default_factory=lambda: CallOptions(20))
    problem: Optional[Problem] = None
    aux: int = 0
    header_base: Optional[List[int]] = None
    widths: Optional[Tuple[int, ...]] = None
    lane: Any = None

    @classmethod
    def parse(
        cls,
        *,
        x: Any,
        num_tokens_per_rank: Any,
        is_token_in_rank: Any,
        num_tokens_per_expert: Any,
        topk_idx: Any,
        topk_weights: Any,
        expert_alignment: Any,
        num_worst_tokens: Any,
        compress: Any,
        return_compressed: bool,
        options: CallOptions,
        problem: Optional[Problem],
        wire: Wire,
        num_ranks: int,
        device: torch.device,
        device_plans: bool,
    ) -> "DispatchRequest":
        """Validate a fresh dispatch's arguments (see the class docstring); never raises for bad input.

        Args:
            device_plans: whether a ``num_worst_tokens`` call of this Buffer builds its plan on the device
                (nvlink, unchecked): a per-call error tolerance is refused there.
            problem: an earlier problem of the call (its options), kept first.
        """
        req = cls(options=options, return_compressed=bool(return_compressed))
        req.tolerance = wire.call_tolerance(compress)  # from the Buffer and `compress` only: ranks agree
        if isinstance(num_worst_tokens, int) and not isinstance(num_worst_tokens, bool) and num_worst_tokens >= 0:
            req.num_worst_tokens = num_worst_tokens
        try:
            if problem is not None:
                raise problem
            if not isinstance(expert_alignment, int) or isinstance(expert_alignment, bool) or expert_alignment < 1:
                raise Problem(7, DeepEPInputError(f"expert_alignment must be an int >= 1, got {expert_alignment!r}"))
            req.expert_alignment = expert_alignment
            if req.num_worst_tokens is not num_worst_tokens:
                raise Problem(7, DeepEPInputError(f"num_worst_tokens must be an int >= 0, got {num_worst_tokens!r}"))
            if req.tolerance is not None and req.num_worst_tokens > 0 and device_plans:
                raise Problem(
                    7,
                    DeepEPInputError(
                        "compression_tolerance needs a host exchange per dispatch, which the num_worst_tokens device "
                        "path never waits for: use compression_ratio (a byte target) or compress=<level> for "
                        "num_worst_tokens dispatches"
                    ),
                )
            req.x, req.scales = validate.parse_x(x, device)
            T, H = req.x.size(0), req.x.size(1)
            req.num_tokens, req.hidden = T, H
            req.codec = dispatch_codec(wire, compress, req.x, req.scales)
            if topk_idx is None and topk_weights is not None:
                raise Problem(3, DeepEPInputError("topk_weights given without topk_idx"))
            if topk_idx is None and is_token_in_rank is None:
                raise Problem(
                    5,
                    DeepEPInputError(
                        "dispatch needs topk_idx (with num_tokens_per_expert) or "
                        "is_token_in_rank, or a handle for a cached dispatch"
                    ),
                )
            if topk_idx is not None:
                if num_tokens_per_expert is None:
                    raise Problem(
                        5,
                        DeepEPInputError(
                            "dispatch with topk_idx needs num_tokens_per_expert (from get_dispatch_layout), "
                            "which also tells the number of experts"
                        ),
                    )
                if not isinstance(num_tokens_per_expert, torch.Tensor) or num_tokens_per_expert.dim() != 1:
                    raise Problem(5, DeepEPInputError("num_tokens_per_expert must be a 1-D tensor [num_experts]"))
                E = num_tokens_per_expert.numel()
                if E == 0 or E % num_ranks != 0:
                    raise Problem(
                        5,
                        DeepEPInputError(
                            f"num_experts={E} (length of num_tokens_per_expert) is not a positive multiple of the "
                            f"number of ranks {num_ranks}"
                        ),
                    )
                # The id range travels with the metadata (no host sync of its own): checked on the host
                # after the exchange, or on the device (reported at the next call) by a num_worst_tokens one.
                validate.check_topk(topk_idx, E, T, device, values="none")
                req.num_experts, req.num_topk = E, topk_idx.size(1)
                req.topk_idx = topk_idx.contiguous()
                req.num_tokens_per_expert = num_tokens_per_expert
                req.topk_weights = validate.check_weights(topk_weights, (T, req.num_topk), "topk_weights", device)
            if is_token_in_rank is not None:
                if (
                    not isinstance(is_token_in_rank, torch.Tensor)
                    or is_token_in_rank.dtype != torch.bool
                    or tuple(is_token_in_rank.shape) != (T, num_ranks)
                ):
                    raise Problem(
                        5,
                        DeepEPInputError(
                            f"is_token_in_rank must be a bool tensor [{T}, {num_ranks}], got "
                            f"{getattr(is_token_in_rank, 'dtype', type(is_token_in_rank).__name__)} "
                            f"{list(getattr(is_token_in_rank, 'shape', []))}"
                        ),
                    )
                validate.check_device(is_token_in_rank, device, "is_token_in_rank", code=5)
                req.is_token_in_rank = is_token_in_rank.contiguous()
            if num_tokens_per_rank is not None and (
                not isinstance(num_tokens_per_rank, torch.Tensor) or num_tokens_per_rank.numel() != num_ranks
            ):
                raise Problem(5, DeepEPInputError(f"num_tokens_per_rank must be a tensor [{num_ranks}]"))
        except Problem as p:
            req.problem = p
        return req

    def clone(self) -> "DispatchRequest":
        """A shallow copy (``copy.copy`` costs microseconds on a dataclass; this a fraction of one)."""
        new = object.__new__(DispatchRequest)
        new.__dict__.update(self.__dict__)
        return new

    def header(self, seq: int, call_id: int = 0) -> List[int]:
        """The call's metadata header (operation, call number, verdict on the local input, shapes)."""
        base = self.header_base
        if base is not None:
            h = base[:]
            h[_H_SEQ], h[_H_IDENT] = seq, call_id
            return h
        return make_header(
            _OP_DISPATCH,
            seq,
            self.problem.code if self.problem else 0,
            self.num_tokens,
            self.hidden,
            self.x.dtype if self.x is not None else None,
            self.num_topk,
            self.num_experts,
            self.scales.size(1) if self.scales is not None else -1,
            int(self.topk_weights is not None),
            self.num_worst_tokens,
            level=Wire.header_code(self.codec),
            ident=call_id,
            aux=self.aux,
        )

    def rows(self) -> List[torch.Tensor]:
        """The row tensors the transport moves, in order: ``x``, its scales, the top-k ids and weights."""
        rows = [self.x]
        if self.scales is not None:
            rows.append(self.scales)
        if self.topk_idx is not None:
            rows.append(self.topk_idx)
            if self.topk_weights is not None:
                rows.append(self.topk_weights)
        return rows


@dataclass
class CachedDispatchRequest:
    """A dispatch with a handle (the layout known), validated.

    Attributes:
        handle: the :class:`~deep_ep.buffer.DispatchHandle` (checked to be this Buffer's).
        x, scales: as in :class:`DispatchRequest`.
        hidden: ``H`` (-1 if unknown).
        codec, tolerance, return_compressed, options, problem: as in :class:`DispatchRequest`.
    """

    handle: Any = None
    x: Optional[torch.Tensor] = None
    scales: Optional[torch.Tensor] = None
    hidden: int = -1
    codec: Optional[Codec] = None
    tolerance: Optional[float] = None
    return_compressed: bool = False
    options: CallOptions = field(default_factory=lambda: CallOptions(20))
    problem: Optional[Problem] = None
    aux: int = 0

    def header(self, seq: int, call_id: int = 0) -> List[int]:
        """The call's metadata header."""
        return make_header(
            _OP_CACHED,
            seq,
            self.problem.code if self.problem else 0,
            H=self.hidden,
            dtype=self.x.dtype if self.x is not None else None,
            scales=self.scales.size(1) if self.scales is not None else -1,
            level=Wire.header_code(self.codec),
            ident=call_id,
            aux=self.aux,
        )

    def rows(self) -> List[torch.Tensor]:
        """``x`` and, for an fp8 pair, its scales."""
        return [self.x] + ([] if self.scales is None else [self.scales])

    @classmethod
    def parse(
        cls,
        x: Any,
        handle: Any,
        layout_args: Tuple[Any, ...],
        compress: Any,
        return_compressed: Any,
        options: CallOptions,
        problem: Optional[Problem],
        wire: Wire,
        device: torch.device,
        check_handle: Callable[[Any], Any],
    ) -> "CachedDispatchRequest":
        """Validate a cached dispatch's arguments; a bad one becomes :attr:`problem` (the call still joins
        the agreement).

        Args:
            x, handle, compress, return_compressed: :meth:`deep_ep.Buffer.dispatch`'s.
            layout_args: the layout / top-k arguments (all ``None`` for a cached dispatch).
            options, problem: the parsed stream options and their problem.
            wire: the Buffer's :class:`~deep_ep.wire.Wire`; device: its device.
            check_handle: the Buffer's check that ``handle`` is one of its handles (raises a ``Problem``).

        Returns:
            The request.
        """
        req = cls(options=options, return_compressed=bool(return_compressed))
        req.tolerance = wire.call_tolerance(compress)
        try:
            if problem is not None:
                raise problem
            if any(a is not None for a in layout_args):
                raise Problem(
                    5,
                    DeepEPInputError(
                        "a cached dispatch (handle given) takes no layout, topk_idx or "
                        "topk_weights arguments: the handle carries the layout"
                    ),
                )
            req.handle = check_handle(handle)
            req.x, req.scales = validate.parse_x(x, device)
            req.hidden = req.x.size(1)
            req.codec = dispatch_codec(wire, compress, req.x, req.scales)
            if req.x.size(0) != handle.plan.num_tokens:
                raise Problem(
                    1,
                    DeepEPInputError(
                        f"x has {req.x.size(0)} tokens but the handle was made for {handle.plan.num_tokens}"
                    ),
                )
        except Problem as p:
            req.problem = p
        return req


@dataclass
class CombineRequest:
    """A combine, validated (docs/api.md, combine).

    Attributes:
        handle: the dispatch's handle.
        x: ``[N, H]`` rows laid out as the received ones, contiguous.
        hidden: ``H`` (-1 if unknown).
        topk_weights: float32 ``[N, K]`` summed like the rows, or ``None``.
        biases: 0, 1 or 2 tensors ``[T, H]`` added to the sums.
        codec: the wire codec of the returned rows (level 8), or ``None``.
        options, problem: as in :class:`DispatchRequest`.
    """

    handle: Any = None
    x: Optional[torch.Tensor] = None
    hidden: int = -1
    topk_weights: Optional[torch.Tensor] = None
    biases: List[torch.Tensor] = field(default_factory=list)
    codec: Optional[Codec] = None
    options: CallOptions = field(default_factory=lambda: CallOptions(20))
    problem: Optional[Problem] = None
    aux: int = 0

    def header(self, seq: int, call_id: int = 0) -> List[int]:
        """The call's metadata header."""
        return make_header(
            _OP_COMBINE,
            seq,
            self.problem.code if self.problem else 0,
            H=self.hidden,
            dtype=self.x.dtype if self.x is not None else None,
            has_w=int(self.topk_weights is not None),
            level=Wire.header_code(self.codec),
            ident=call_id,
            aux=self.aux,
        )

    @classmethod
    def parse(
        cls,
        x: Any,
        handle: Any,
        topk_weights: Any,
        bias: Any,
        compress: Any,
        options: CallOptions,
        problem: Optional[Problem],
        wire: Wire,
        device: torch.device,
        check_handle: Callable[[Any], Any],
    ) -> "CombineRequest":
        """Validate a combine's arguments; a bad one becomes :attr:`problem` (the call still joins the
        agreement).

        Args:
            x, handle, topk_weights, bias, compress: :meth:`deep_ep.Buffer.combine`'s.
            options, problem: the parsed stream options and their problem.
            wire: the Buffer's :class:`~deep_ep.wire.Wire`; device: its device.
            check_handle: the Buffer's check that ``handle`` is one of its handles (raises a ``Problem``).

        Returns:
            The request.
        """
        req = cls(options=options)
        try:
            if problem is not None:
                raise problem
            req.handle = check_handle(handle)
            plan = req.handle.plan
            if not isinstance(x, torch.Tensor):
                raise Problem(1, DeepEPTypeError(f"combine x must be a tensor, got {type(x).__name__}"))
            if x.dtype not in validate.FLOAT_DTYPES:
                raise Problem(1, DeepEPTypeError(f"combine x must be bfloat16 (or float16/32/64), got {x.dtype}"))
            if x.dim() != 2 or x.size(0) not in (plan.num_recv_tokens, plan.num_out_rows):
                worst = f" or num_worst_tokens={plan.num_out_rows}" if plan.num_out_rows != plan.num_recv_tokens else ""
                raise Problem(
                    1,
                    DeepEPInputError(
                        f"combine x must be [num_recv_tokens={plan.num_recv_tokens}{worst}, hidden], "
                        f"got {list(x.shape)}"
                    ),
                )
            validate.check_device(x, device, "x")
            req.x = x.contiguous()
            req.hidden = H = req.x.size(1)
            try:
                level = wire.combine_level if compress is True else wire.call_level(compress)[0]
            except DeepEPInputError as e:
                raise Problem(7, e) from None
            if level not in (16, 8):
                raise Problem(7, DeepEPInputError(f"combine compresses to 8 bits at most, got compress={compress!r}"))
            req.codec = wire.codec(level, H) if req.x.dtype != torch.float64 else None
            if topk_weights is not None:
                k = topk_weights.size(1) if isinstance(topk_weights, torch.Tensor) and topk_weights.dim() == 2 else -1
                req.topk_weights = validate.check_weights(topk_weights, (req.x.size(0), k), "topk_weights", device)
            if bias is not None:
                biases = list(bias) if isinstance(bias, (tuple, list)) else [bias]
                if len(biases) > 2:
                    raise Problem(6, DeepEPInputError(f"bias takes at most 2 tensors, got {len(biases)}"))
                for b in biases:
                    if not isinstance(b, torch.Tensor) or tuple(b.shape) != (plan.num_tokens, H):
                        raise Problem(
                            6,
                            DeepEPInputError(
                                f"each bias must be a tensor [{plan.num_tokens}, {H}], got "
                                f"{list(getattr(b, 'shape', [])) or type(b).__name__}"
                            ),
                        )
                    if b.dtype not in validate.FLOAT_DTYPES:
                        raise Problem(6, DeepEPTypeError(f"bias must be floating point, got {b.dtype}"))
                    validate.check_device(b, device, "bias", code=6)
                req.biases = biases
        except Problem as p:
            req.problem = p
        return req


def dispatch_codec(wire: Wire, compress: Any, xv: torch.Tensor, scales: Optional[torch.Tensor]) -> Optional[Codec]:
    """The codec of a dispatch's rows (``None``: they travel as they are), or a :class:`Problem`."""
    try:
        level, ratio = wire.call_level(compress)
        if level == 16 or scales is not None or not xv.is_floating_point() or xv.dtype == torch.float64:
            return None  # an fp8 pair is already in its wire format; float64 rows travel exact
        if wire.call_tolerance(compress) is not None:
            return wire.upgrades_codec(xv.size(1))  # k: agreed in wire.agree_upgrades
        return wire.codec(level, xv.size(1), ratio)
    except DeepEPInputError as e:
        raise Problem(7, e) from None
