"""``Buffer``: the DeepEP-compatible front door (API.md section 2).

It validates every call, computes the layout (:mod:`deep_ep.layout`), agrees
on metadata with the other ranks (so that ranks that disagree, or a rank
whose input is bad, make every rank raise instead of hang), builds the
handle, and hands the rows to a transport (:mod:`deep_ep.transport`).
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import layout, validate
from .agreement import (
    _H_DTYPE,
    _H_E,
    _H_HIDDEN,
    _H_K,
    _H_LEVEL,
    _H_SCALES,
    _H_W,
    _OP_CACHED,
    _OP_COMBINE,
    _OP_DISPATCH,
    Problem,
    agree,
    make_header,
)
from .config import Config, EventOverlap, recommended_config
from .errors import BufferDestroyedError, DeepEPError, DeepEPInputError, DeepEPTypeError
from .low_latency import LowLatencyMethods
from .plans import _EXPERT_SLOTS, DeferredChecks, build_device_plan, build_host_plan, localize_received
from .settings import Settings
from .streams import StreamCall
from .transport import Plan, Transport, Waiter, group_device, select_backend, transport_class
from .wire import Wire, WireMethods

log = logging.getLogger("deep_ep")

XType = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]

_FP8 = validate.FP8_DTYPES
_FLOAT_X = validate.FLOAT_DTYPES
_COMPRESSION_LEVELS = (16, 8, 4, "auto")
_buffer_counter: Dict[str, itertools.count] = {}
#: the header fields a fresh dispatch's metadata exchange checks (plans.build_host_plan's)
_DISPATCH_FIELDS = (
    (_H_HIDDEN, "hidden size"),
    (_H_DTYPE, "x dtype"),
    (_H_K, "num_topk"),
    (_H_E, "num_experts"),
    (_H_SCALES, "fp8 scale columns"),
    (_H_W, "passing topk_weights"),
    (_H_LEVEL, "compression level"),
)


class DispatchHandle(NamedTuple):
    """The handle ``dispatch`` returns; element 0 is ``rank_prefix_matrix`` (API.md 2.2).

    Pass it to ``combine`` and to a cached ``dispatch``. The other fields are
    deep_ep's: the token-to-rank mask, the number of real received rows, the
    padded row count of ``num_worst_tokens`` calls, the transport's plan and
    the id of the Buffer that made it.
    """

    rank_prefix_matrix: torch.Tensor
    is_token_in_rank: torch.Tensor
    num_recv_tokens: int
    num_worst_tokens: int
    plan: Plan
    owner: int


class Buffer(LowLatencyMethods, WireMethods):
    """The expert-parallel communication buffer (DeepEP v1 API; API.md section 2).

    Arguments (DeepEP's, positional order kept): ``group`` a
    ``torch.distributed`` process group (NCCL on GPUs, gloo on CPU; ``None``
    means the default group); ``num_nvl_bytes`` / ``num_rdma_bytes`` upper
    bounds of staging memory; ``low_latency_mode`` and the remaining DeepEP
    arguments are accepted for compatibility. Keyword-only (deep_ep's):
    ``backend`` ('auto', 'collective', 'nvlink', 'hierarchical'),
    ``ep_buffer_size`` (pipelining chunk, bytes; env ``DEEP_EP_BUFFER_SIZE``,
    default 4 MiB), ``compression_level`` (16, 8, 4, 'auto'; env
    ``DEEP_EP_COMPRESSION_LEVEL``), ``compression_ratio`` (``'auto'``'s byte
    target) or ``compression_tolerance`` (``'auto'``'s per-row error bound,
    in (0, 1); env ``DEEP_EP_COMPRESSION_TOLERANCE``; one extra host-synced
    exchange per dispatch, see :mod:`deep_ep.wire`), ``topology_aware`` (env
    ``DEEP_EP_TOPOLOGY_AWARE``; off: ``'auto'`` takes the flat ``collective``
    path across hosts), ``ranks_per_node`` (``hierarchical``: emulate nodes;
    env ``DEEP_EP_RANKS_PER_NODE``), ``timeout_s`` (bound of every host wait,
    env ``DEEP_EP_TIMEOUT_S``, default 100 s).

    Constructing a Buffer is collective: every rank of the group must do it,
    in the same order as their other Buffers.
    """

    #: SMs (persistent programs) the intranode kernels use; see :meth:`set_num_sms`.
    num_sms: int = 20

    def __init__(
        self,
        group: Optional[dist.ProcessGroup] = None,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        use_fabric: bool = False,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        comm: Any = None,
        *,
        backend: str = "auto",
        ep_buffer_size: Optional[int] = None,
        compression_level: Union[int, str, None] = 16,
        topology_aware: Optional[bool] = None,
        timeout_s: Optional[float] = None,
        compression_ratio: Optional[float] = None,
        combine_compression_level: Union[int, str] = 16,
        compression_stats: Optional[bool] = None,
        ranks_per_node: Optional[int] = None,
        compression_tolerance: Optional[float] = None,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise DeepEPError(
                "deep_ep.Buffer needs torch.distributed initialised "
                "(torch.distributed.init_process_group(...), e.g. under torchrun)"
            )
        if group is None:
            group = dist.group.WORLD
        for name, v in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            if not isinstance(v, int) or v < 0:
                raise DeepEPInputError(f"{name} must be a non-negative int, got {v!r}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        self.num_ranks = self.group_size
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = bool(low_latency_mode)
        self.num_qps_per_rank = num_qps_per_rank
        self.allow_nvlink_for_low_latency_mode = allow_nvlink_for_low_latency_mode
        self.allow_mnnvl = allow_mnnvl
        self.use_fabric = use_fabric
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = enable_shrink

        # deep_ep's knobs: arguments, else their environment variables (deep_ep.settings), resolved once.
        self.settings = Settings.resolve(
            timeout_s=timeout_s,
            ep_buffer_size=ep_buffer_size,
            compression_level=compression_level,
            compression_ratio=compression_ratio,
            compression_tolerance=compression_tolerance,
            combine_compression_level=combine_compression_level,
            compression_stats=compression_stats,
            topology_aware=topology_aware,
            ranks_per_node=ranks_per_node,
        )
        self.ep_buffer_size = self.settings.ep_buffer_size
        self._wire = Wire.from_settings(self.settings)
        self.compression_level = self._wire.level
        self.topology_aware = self.settings.topology_aware
        self.timeout_s = self.settings.timeout_s

        self.device = group_device(group)  # CUDA for an NCCL group (or a gloo one mapped to CUDA)
        if backend == "auto":
            backend, self.backend_reason = select_backend(group, self.topology_aware)
        else:
            self.backend_reason = "chosen by the caller"
        cls = transport_class(backend)
        self.backend = backend
        self._comm_stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None

        gname = getattr(group, "group_name", None) or str(id(group))
        counter = _buffer_counter.setdefault(gname, itertools.count())
        self._uid = next(counter)
        self._waiter = Waiter(group, f"deep_ep/{gname}/buffer{self._uid}", self.timeout_s)
        self._transport: Transport = cls(group, self.device, self._waiter, self.settings, num_nvl_bytes)
        self._check_every_call = self.device.type != "cuda" or self.settings.check_every_call
        self._local_buffers: Dict[bool, torch.Tensor] = {}
        self._zero_slots: Optional[torch.Tensor] = None
        self._checks = DeferredChecks()  # device-side verdicts of num_worst_tokens dispatches
        self._ll_nvlink = None  # the low-latency kernel path's state (its first call makes it)
        self._destroyed = False
        log.debug(
            "deep_ep.Buffer rank %d/%d backend=%s (%s) device=%s",
            self.rank,
            self.num_ranks,
            self.backend,
            self.backend_reason,
            self.device,
        )

    # ------------------------------------------------------------------ class-level
    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the number of SMs the intranode kernels use (must be even and positive)."""
        if not isinstance(new_num_sms, int) or new_num_sms <= 0 or new_num_sms % 2 != 0:
            raise DeepEPInputError(f"the SM count must be a positive even int, got {new_num_sms!r}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def is_sm90_compiled() -> bool:
        """True where the FP8 paths are available (fp8 dtypes exist in this torch)."""
        return bool(_FP8)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """A recommended dispatch :class:`Config` for ``num_ranks`` ranks (DeepEP's table)."""
        return recommended_config("dispatch", num_ranks, Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """A recommended combine :class:`Config` for ``num_ranks`` ranks (DeepEP's table)."""
        return recommended_config("combine", num_ranks, Buffer.num_sms)

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        """Staging bytes a low-latency call may need (pass them as ``num_nvl_bytes`` on nvlink)."""
        from .low_latency import rdma_size_hint

        return rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    # ------------------------------------------------------------------ instance utilities
    def _check_alive(self) -> None:
        if self._destroyed:
            raise BufferDestroyedError("this deep_ep.Buffer was destroyed")
        if self._waiter.broken:
            raise BufferDestroyedError(f"this deep_ep.Buffer is unusable: an earlier call {self._waiter.broken}")
        if self._checks.pending and not torch.cuda.is_current_stream_capturing():
            self._checks.raise_ready()  # verdicts of earlier num_worst_tokens dispatches

    def capture(self) -> EventOverlap:
        """An :class:`EventOverlap` recorded on the current stream (no event on CPU)."""
        if self.device.type != "cuda":
            return EventOverlap(None)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return EventOverlap(ev)

    def get_comm_stream(self) -> Optional[torch.cuda.Stream]:
        """The stream communication runs on (``None`` on CPU)."""
        return self._comm_stream

    def get_local_buffer_tensor(
        self, dtype: torch.dtype, size: Optional[torch.Size] = None, offset: int = 0, use_rdma_buffer: bool = False
    ) -> torch.Tensor:
        """A view of this rank's staging memory (``num_nvl_bytes``, or ``num_rdma_bytes``) as ``dtype``,
        starting ``offset`` bytes in (bytes, as DeepEP counts it).

        The collective transport stages nothing, so this memory is a plain
        local allocation made on first use; it is yours to read and write.
        """
        self._check_alive()
        nbytes = self.num_rdma_bytes if use_rdma_buffer else self.num_nvl_bytes
        if use_rdma_buffer not in self._local_buffers:
            self._local_buffers[use_rdma_buffer] = torch.zeros((nbytes,), dtype=torch.uint8, device=self.device)
        raw = self._local_buffers[use_rdma_buffer]
        elem = torch.empty((), dtype=dtype, device="cpu").element_size()
        if offset < 0 or offset > nbytes or offset % elem != 0:
            raise DeepEPInputError(
                f"offset {offset} (bytes, as DeepEP) must lie in the {nbytes}-byte buffer "
                f"and be a multiple of {elem} for {dtype}"
            )
        usable = (nbytes - offset) // elem
        t = raw[offset : offset + usable * elem].view(dtype)
        if size is None:
            return t
        size = torch.Size(size)
        if size.numel() > t.numel():
            raise DeepEPInputError(
                f"requested {size.numel()} elements of {dtype}, the buffer holds {t.numel()} after offset {offset}"
            )
        return t[: size.numel()].view(size)

    def destroy(self) -> None:
        """Release the Buffer's resources; it cannot be used afterwards. Idempotent."""
        if self._destroyed:
            return
        if self._ll_nvlink is not None:
            self._ll_nvlink.destroy()
        self._transport.destroy()
        self._local_buffers.clear()
        self._destroyed = True

    def _call(self, previous_event, async_finish, allocate_on_comm_stream) -> StreamCall:
        return StreamCall(self.device, self._comm_stream, previous_event, async_finish, allocate_on_comm_stream)

    # ------------------------------------------------------------------ validation helpers
    def _parse_x(self, x: Any, what: str = "x") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return validate.parse_x(x, self.device, what)

    def _check_device(self, t: torch.Tensor, what: str) -> None:
        validate.check_device(t, self.device, what)

    def _check_topk(self, topk_idx: torch.Tensor, num_experts: int, T: int, values: str = "host") -> None:
        validate.check_topk(topk_idx, num_experts, T, self.device, values)

    def _check_weights(
        self, topk_weights: Optional[torch.Tensor], shape: Tuple[int, int], what: str
    ) -> Optional[torch.Tensor]:
        return validate.check_weights(topk_weights, shape, what, self.device)

    # ------------------------------------------------------------------ layout
    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, EventOverlap]:
        """Tokens per rank / node / expert and the token-to-rank mask (API.md 2.1). Local, no communication."""
        self._check_alive()
        layout.num_local_experts(num_experts, self.num_ranks)
        try:
            # On CUDA ids outside the range are dropped by the layout (no sync) and rejected by dispatch.
            on_cpu = not (isinstance(topk_idx, torch.Tensor) and topk_idx.is_cuda)
            self._check_topk(
                topk_idx,
                num_experts,
                topk_idx.size(0) if isinstance(topk_idx, torch.Tensor) else -1,
                values="host" if on_cpu else "none",
            )
        except Problem as p:
            raise p.exc from None
        call = self._call(previous_event, async_finish, allocate_on_comm_stream)
        with call:
            per_rank, per_node, per_expert, in_rank = layout.dispatch_layout(
                topk_idx, num_experts, self.num_ranks, ranks_per_node=self._transport.ranks_per_node
            )
            outs = [per_rank, per_expert, in_rank]
            if call.cuda and not call.on_comm:
                for t in outs:
                    t.record_stream(call.compute)
        event = call.finish([topk_idx] + outs)
        return per_rank, per_node, per_expert, in_rank, event

    # ------------------------------------------------------------------ dispatch
    def dispatch(
        self,
        x: XType,
        handle: Optional[DispatchHandle] = None,
        num_tokens_per_rank: Optional[torch.Tensor] = None,
        num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
        is_token_in_rank: Optional[torch.Tensor] = None,
        num_tokens_per_expert: Optional[torch.Tensor] = None,
        topk_idx: Optional[torch.Tensor] = None,
        topk_weights: Optional[torch.Tensor] = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
        *,
        compress: Union[bool, int, str] = True,
        return_compressed: bool = False,
    ):
        """Send each token to every rank that hosts one of its experts (API.md 2.2).

        Returns ``(recv_x, recv_topk_idx, recv_topk_weights,
        num_recv_tokens_per_expert_list, handle, event)``; with ``handle``
        (cached dispatch) ``(recv_x, None, None, None, None, event)``.
        Received rows are grouped by source rank, then source token order.
        Floating ``x`` crosses the wire in the Buffer's ``compression_level``
        (``compress``: ``False`` = 16-bit, a level, or a float in (0, 1) =
        ``'auto'`` at that byte ratio, for this call; the same on every rank); ``recv_x`` is decoded to ``x.dtype``, or with
        ``return_compressed`` left encoded (:class:`~deep_ep.wire.CompressedRows`).
        With ``compression_tolerance`` (``compress=True``) the ranks first agree on the call's ``'auto'``
        upgrades from the rows they send (one extra host-synced exchange; :mod:`deep_ep.wire`).
        """
        self._check_alive()
        call = self._call(previous_event, async_finish, allocate_on_comm_stream)
        self._transport.num_sms = config.num_sms if isinstance(config, Config) else Buffer.num_sms
        if not isinstance(num_worst_tokens, int) or num_worst_tokens < 0:
            worst_arg, num_worst_tokens = num_worst_tokens, 0
        else:
            worst_arg = num_worst_tokens
        if handle is not None:
            return self._cached_dispatch(
                call,
                x,
                handle,
                num_tokens_per_rank,
                is_token_in_rank,
                num_tokens_per_expert,
                topk_idx,
                topk_weights,
                compress,
                return_compressed,
            )
        problem: Optional[Problem] = None
        xv = scales = codec = None
        T = H = K = E = -1
        tol = self._wire.call_tolerance(compress)  # from the Buffer and `compress` only: ranks agree
        has_device = self._transport.device_layout
        try:
            # Argument problems travel through the metadata exchange too, so no rank is left waiting.
            if config is not None and not isinstance(config, Config):
                raise Problem(7, DeepEPTypeError(f"config must be a deep_ep.Config, got {type(config).__name__}"))
            if not isinstance(expert_alignment, int) or expert_alignment < 1:
                raise Problem(7, DeepEPInputError(f"expert_alignment must be an int >= 1, got {expert_alignment!r}"))
            if worst_arg is not num_worst_tokens:
                raise Problem(7, DeepEPInputError(f"num_worst_tokens must be an int >= 0, got {worst_arg!r}"))
            if tol is not None and num_worst_tokens > 0 and has_device and not self._check_every_call:
                raise Problem(
                    7,
                    DeepEPInputError(
                        "compression_tolerance needs a host exchange per dispatch, which the num_worst_tokens device "
                        "path never waits for: use compression_ratio (a byte target) or compress=<level> for "
                        "num_worst_tokens dispatches"
                    ),
                )
            xv, scales = self._parse_x(x)
            T, H = xv.size(0), xv.size(1)
            codec = self._dispatch_codec(compress, xv, scales)
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
                if E == 0 or E % self.num_ranks != 0:
                    raise Problem(
                        5,
                        DeepEPInputError(
                            f"num_experts={E} (length of num_tokens_per_expert) is not a positive multiple of the "
                            f"number of ranks {self.num_ranks}"
                        ),
                    )
                # The id range travels with the metadata (no host sync of its own): checked on the host
                # after the exchange, or on the device (reported at the next call) by a num_worst_tokens one.
                self._check_topk(topk_idx, E, T, values="none")
                K = topk_idx.size(1)
                topk_weights = self._check_weights(topk_weights, (T, K), "topk_weights")
            if is_token_in_rank is not None:
                if (
                    not isinstance(is_token_in_rank, torch.Tensor)
                    or is_token_in_rank.dtype != torch.bool
                    or tuple(is_token_in_rank.shape) != (T, self.num_ranks)
                ):
                    raise Problem(
                        5,
                        DeepEPInputError(
                            f"is_token_in_rank must be a bool tensor [{T}, {self.num_ranks}], got "
                            f"{getattr(is_token_in_rank, 'dtype', type(is_token_in_rank).__name__)} "
                            f"{list(getattr(is_token_in_rank, 'shape', []))}"
                        ),
                    )
                self._check_device(is_token_in_rank, "is_token_in_rank")
            if num_tokens_per_rank is not None and (
                not isinstance(num_tokens_per_rank, torch.Tensor) or num_tokens_per_rank.numel() != self.num_ranks
            ):
                raise Problem(5, DeepEPInputError(f"num_tokens_per_rank must be a tensor [{self.num_ranks}]"))
        except Problem as p:
            problem = p
        self._waiter.seq += 1

        with call:
            if problem is None:
                if is_token_in_rank is None:
                    _, _, per_expert, is_token_in_rank = layout.dispatch_layout(topk_idx, E, self.num_ranks)
                else:
                    per_expert = num_tokens_per_expert
                    is_token_in_rank = is_token_in_rank.contiguous()
                counts = is_token_in_rank.sum(dim=0, dtype=torch.int64)
            else:
                counts = torch.zeros((self.num_ranks,), dtype=torch.int64, device=self.device)
                per_expert = None
            if problem is None and topk_idx is not None and topk_idx.numel():
                id_range = torch.stack(torch.aminmax(topk_idx))
            else:
                id_range = torch.full((2,), -1, dtype=torch.int64, device=self.device)
            payload = [counts, id_range]
            # Transports whose exchange has fixed-size slots carry the expert counts in the same
            # exchange (ranks that disagree on num_experts cannot hang it). Others get a fixed number
            # of slots (_EXPERT_SLOTS, the same length on every rank whatever its input), which carry
            # the counts where num_experts fits; a larger num_experts needs a second exchange.
            merged = self._transport.fixed_slot_exchange
            has_pe = per_expert is not None and topk_idx is not None
            if merged:
                if has_pe:
                    payload.append(per_expert)
            else:
                if self._zero_slots is None:  # read-only padding, made once (a slice of it costs no kernel)
                    self._zero_slots = torch.zeros((_EXPERT_SLOTS,), dtype=torch.int64, device=self.device)
                if has_pe and E <= _EXPERT_SLOTS:
                    payload.append(per_expert)
                    if E < _EXPERT_SLOTS:
                        payload.append(self._zero_slots[: _EXPERT_SLOTS - E])
                else:
                    payload.append(self._zero_slots)
            header = make_header(
                _OP_DISPATCH,
                self._waiter.seq,
                problem.code if problem else 0,
                T,
                H,
                xv.dtype if xv is not None else None,
                K,
                E,
                scales.size(1) if scales is not None else -1,
                int(topk_weights is not None),
                num_worst_tokens,
                level=Wire.header_code(codec),
            )
            if tol is not None:  # every rank of the call, bad input or not (see _agree_upgrades)
                codec = self._agree_upgrades(
                    tol, codec, xv, is_token_in_rank, header, payload, problem, _DISPATCH_FIELDS
                )
                header[_H_LEVEL] = Wire.header_code(codec)
            R = self.num_ranks
            if num_worst_tokens > 0 and problem is None and has_device and not self._check_every_call:
                # Nothing read on the host: the plan stays on the device (capturable; checks deferred).
                plan = build_device_plan(
                    self._transport,
                    self._checks,
                    header,
                    payload,
                    is_token_in_rank,
                    T,
                    num_worst_tokens,
                    self._waiter.seq,
                    torch.cuda.is_current_stream_capturing(),
                )
                L, expert_list = (E // R if E > 0 else 0), []
            else:
                plan, L, expert_list = build_host_plan(
                    self,
                    header,
                    payload,
                    problem,
                    merged,
                    per_expert,
                    is_token_in_rank,
                    topk_idx,
                    T,
                    E,
                    num_worst_tokens,
                    expert_alignment,
                )
        return self._finish_dispatch(
            call, plan, xv, scales, topk_idx, topk_weights, L, expert_list, num_worst_tokens, codec, return_compressed
        )

    def _finish_dispatch(
        self,
        call: StreamCall,
        plan: Plan,
        xv,
        scales,
        topk_idx,
        topk_weights,
        L: int,
        expert_list: Optional[List[int]],
        num_worst_tokens: int,
        codec=None,
        return_compressed: bool = False,
    ):
        """Move the rows of a fresh dispatch (inside ``call``), localise the top-k ids, make the handle."""
        n_recv = plan.num_recv_tokens
        with call:
            rows = [xv]
            if scales is not None:
                rows.append(scales)
            if topk_idx is not None:
                rows.append(topk_idx.contiguous())
                if topk_weights is not None:
                    rows.append(topk_weights)
            recv, recv_x = self._move_rows(plan, rows, call.alloc, codec, return_compressed)
            self._record_wire(codec, xv, plan)
            i = 1
            if scales is not None:
                recv_x = (recv[0], recv[1])
                i = 2
            recv_idx = recv_w = None
            if topk_idx is not None:
                recv_idx, recv_w = localize_received(
                    plan, recv[i], recv[i + 1] if topk_weights is not None else None, self.rank, L
                )
            handle_out = DispatchHandle(
                plan.rank_prefix_matrix, plan.is_token_in_rank, n_recv, num_worst_tokens, plan, self._uid
            )
        made = [t for t in (recv_x, recv_idx, recv_w) if isinstance(t, torch.Tensor)]
        event = call.finish([xv, scales, topk_idx, topk_weights, plan.is_token_in_rank] + list(recv) + made)
        if expert_list is None:
            expert_list = []
        return recv_x, recv_idx, recv_w, expert_list, handle_out, event

    def _move_rows(self, plan: Plan, rows: List[torch.Tensor], alloc, codec, return_compressed: bool):
        """Dispatch ``rows`` by ``plan``; ``(received tensors, received x)``. With a codec ``rows[0]`` travels
        encoded: decoded by the transport (``dispatch_encoded``), or kept encoded (``return_compressed``)."""
        if codec is None:
            recv = self._transport.dispatch(plan, rows, alloc)
            return recv, recv[0]
        if not return_compressed:
            recv = self._transport.dispatch_encoded(plan, rows, alloc, codec)
            return recv, recv[0]
        recv = self._transport.dispatch(plan, [codec.encode(rows[0])] + rows[1:], alloc)
        return recv, self._decode(codec, recv[0], rows[0].dtype, True)

    def _check_handle(self, handle: Any) -> DispatchHandle:
        if not isinstance(handle, DispatchHandle):
            raise Problem(
                4,
                DeepEPTypeError(
                    f"handle must be the handle returned by this Buffer's dispatch, got {type(handle).__name__}"
                ),
            )
        if handle.owner != self._uid or handle.plan.num_ranks != self.num_ranks:
            raise Problem(4, DeepEPInputError("handle was made by another Buffer"))
        return handle

    def _cached_dispatch(
        self,
        call: StreamCall,
        x,
        handle,
        num_tokens_per_rank,
        is_token_in_rank,
        num_tokens_per_expert,
        topk_idx,
        topk_weights,
        compress=True,
        return_compressed=False,
    ):
        problem = None
        xv = scales = codec = None
        H = -1
        try:
            if any(
                a is not None
                for a in (num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights)
            ):
                raise Problem(
                    5,
                    DeepEPInputError(
                        "a cached dispatch (handle given) takes no layout, topk_idx or "
                        "topk_weights arguments: the handle carries the layout"
                    ),
                )
            handle = self._check_handle(handle)
            xv, scales = self._parse_x(x)
            H = xv.size(1)
            codec = self._dispatch_codec(compress, xv, scales)
            if xv.size(0) != handle.plan.num_tokens:
                raise Problem(
                    1,
                    DeepEPInputError(f"x has {xv.size(0)} tokens but the handle was made for {handle.plan.num_tokens}"),
                )
        except Problem as p:
            problem = p
        self._waiter.seq += 1
        tol = self._wire.call_tolerance(compress)
        fields = (
            (_H_HIDDEN, "hidden size"),
            (_H_DTYPE, "x dtype"),
            (_H_SCALES, "fp8 scale columns"),
            (_H_LEVEL, "compression level"),
        )
        with call:
            header = make_header(
                _OP_CACHED,
                self._waiter.seq,
                problem.code if problem else 0,
                H=H,
                dtype=xv.dtype if xv is not None else None,
                scales=scales.size(1) if scales is not None else -1,
                level=Wire.header_code(codec),
            )
            if tol is not None:  # every rank of the call, bad input or not (see _agree_upgrades)
                codec = self._agree_upgrades(
                    tol,
                    codec,
                    xv,
                    handle.plan.is_token_in_rank if problem is None else None,
                    header,
                    None,
                    problem,
                    fields,
                )
                header[_H_LEVEL] = Wire.header_code(codec)
            if self._check_every_call:
                agree(self._transport, self.device, header, None, problem, fields)
            elif problem is not None:
                raise problem.exc
            rows = [xv] + ([] if scales is None else [scales])
            recv, recv0 = self._move_rows(handle.plan, rows, call.alloc, codec, return_compressed)
            self._record_wire(codec, xv, handle.plan)
        event = call.finish([xv, scales] + list(recv) + ([recv0] if isinstance(recv0, torch.Tensor) else []))
        recv_x = recv0 if scales is None else (recv[0], recv[1])
        return recv_x, None, None, None, None, event

    # ------------------------------------------------------------------ combine
    def combine(
        self,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: Optional[torch.Tensor] = None,
        bias: Union[torch.Tensor, Tuple[torch.Tensor, ...], None] = None,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
        *,
        compress: Union[bool, int] = True,
    ):
        """Send received rows back and reduce them per token (API.md 2.3).

        Returns ``(combined_x, combined_topk_weights, event)``: for each
        original token, the float32 sum (float64 for float64 x) in rank order of the rows every rank
        returned for it, plus ``bias`` (0, 1 or 2 tensors ``[T, H]``), cast to
        ``x.dtype``. No routing weights are applied. The rows travel in 16 bits
        unless the Buffer has ``combine_compression_level=8`` (``compress``:
        ``False`` = 16 bits, ``8`` = 8 bits for this call).
        """
        self._check_alive()
        if config is not None and not isinstance(config, Config):
            raise DeepEPTypeError(f"config must be a deep_ep.Config, got {type(config).__name__}")
        call = self._call(previous_event, async_finish, allocate_on_comm_stream)
        problem = None
        xv = codec = None
        H = -1
        biases: List[torch.Tensor] = []
        try:
            handle = self._check_handle(handle)
            plan = handle.plan
            if not isinstance(x, torch.Tensor):
                raise Problem(1, DeepEPTypeError(f"combine x must be a tensor, got {type(x).__name__}"))
            if x.dtype not in _FLOAT_X:
                raise Problem(1, DeepEPTypeError(f"combine x must be bfloat16 (or float16/32/64), got {x.dtype}"))
            if x.dim() != 2 or x.size(0) not in (plan.num_recv_tokens, plan.num_out_rows):
                raise Problem(
                    1,
                    DeepEPInputError(
                        f"combine x must be [num_recv_tokens={plan.num_recv_tokens}"
                        f"{f' or num_worst_tokens={plan.num_out_rows}' if plan.num_out_rows != plan.num_recv_tokens else ''}"
                        f", hidden], got {list(x.shape)}"
                    ),
                )
            self._check_device(x, "x")
            xv = x.contiguous()
            H = xv.size(1)
            level = self._wire.combine_level if compress is True else self._wire.call_level(compress)[0]
            if level not in (16, 8):
                raise Problem(7, DeepEPInputError(f"combine compresses to 8 bits at most, got compress={compress!r}"))
            codec = self._wire.codec(level, H) if xv.dtype != torch.float64 else None
            if topk_weights is not None:
                k = topk_weights.size(1) if isinstance(topk_weights, torch.Tensor) and topk_weights.dim() == 2 else -1
                topk_weights = self._check_weights(topk_weights, (xv.size(0), k), "topk_weights")
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
                    if b.dtype not in _FLOAT_X:
                        raise Problem(6, DeepEPTypeError(f"bias must be floating point, got {b.dtype}"))
                    self._check_device(b, "bias")
        except Problem as p:
            problem = p
        self._waiter.seq += 1
        with call:
            if self._check_every_call:
                header = make_header(
                    _OP_COMBINE,
                    self._waiter.seq,
                    problem.code if problem else 0,
                    H=H,
                    dtype=xv.dtype if xv is not None else None,
                    has_w=int(topk_weights is not None),
                    level=Wire.header_code(codec),
                )
                agree(
                    self._transport,
                    self.device,
                    header,
                    None,
                    problem,
                    (
                        (_H_HIDDEN, "hidden size"),
                        (_H_DTYPE, "x dtype"),
                        (_H_W, "passing topk_weights"),
                        (_H_LEVEL, "compression level"),
                    ),
                )
            elif problem is not None:
                raise problem.exc
            out, out_w = self._transport.combine(handle.plan, xv, topk_weights, biases, call.alloc, codec=codec)
        event = call.finish([xv, topk_weights, out, out_w] + biases)
        return out, out_w, event
