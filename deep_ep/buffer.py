"""``Buffer``: the DeepEP-compatible front door (docs/api.md, Buffer).

A call flows as one typed request (:mod:`deep_ep.calls`): the arguments are validated into a
request whose problems travel through the ranks' metadata agreement (:mod:`deep_ep.agreement`,
every rank raises the same error instead of hanging); the request gives the call's header, the
plan is built from the agreed metadata (:mod:`deep_ep.plans`, on the host or, for
``num_worst_tokens`` on nvlink, on the device), and the transport moves the rows
(:mod:`deep_ep.transport`). The Buffer is the only object that talks to its transport; the
layers above it (MoE layer, ``SparseCollective``, ``ElasticBuffer``) use its public methods.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import kernels, layout, validate
from .agreement import (
    _H_DTYPE,
    _H_HIDDEN,
    _H_LEVEL,
    _H_SCALES,
    _H_W,
    Problem,
    agree,
)
from .calls import (
    CachedDispatchRequest,
    CallOptions,
    CombineRequest,
    DispatchRequest,
    parse_call_options,
)
from .config import Config, EventOverlap, recommended_config
from .eager import DEFAULT_OPTIONS, EagerLanes
from .errors import BufferDestroyedError, DeepEPError, DeepEPInputError, DeepEPTypeError
from .low_latency import LowLatency
from .plans import (
    _EXPERT_SLOTS,
    DISPATCH_FIELDS,
    DeferredChecks,
    build_device_plan,
    build_fused_plan,
    build_host_plan,
    localize_received,
)
from .settings import DEFAULT_TIMEOUT_S, Settings
from .streams import StreamCall
from .transport import Plan, Transport, Waiter, group_device, select_backend, transport_class
from .waiting import agree_verdicts
from .wire import Wire, agree_upgrades, received_rows, record_dispatch

log = logging.getLogger("deep_ep")

XType = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]

_FLOAT_X = validate.FLOAT_DTYPES
_FP8 = validate.FP8_DTYPES
_buffer_counter: Dict[str, itertools.count] = {}
#: the header fields of a cached dispatch and of a combine that every rank must agree on
_CACHED_FIELDS = (
    (_H_HIDDEN, "hidden size"),
    (_H_DTYPE, "x dtype"),
    (_H_SCALES, "fp8 scale columns"),
    (_H_LEVEL, "compression level"),
)
_COMBINE_FIELDS = (
    (_H_HIDDEN, "hidden size"),
    (_H_DTYPE, "x dtype"),
    (_H_W, "passing topk_weights"),
    (_H_LEVEL, "compression level"),
)


class DispatchHandle(NamedTuple):
    """The handle ``dispatch`` returns; element 0 is ``rank_prefix_matrix`` (docs/api.md, dispatch).

    Pass it to ``combine`` and to a cached ``dispatch``. The other fields are deep_ep's.

    Attributes:
        rank_prefix_matrix: int32 ``[R, R]``, ``[i][j]`` = tokens ranks ``0..i`` send to rank ``j``.
        is_token_in_rank: bool ``[T, R]``, the token-to-rank mask of the dispatch.
        num_recv_tokens: rows received (-1 when only the device knows it: ``num_worst_tokens`` on nvlink).
        num_worst_tokens: rows of every received tensor when the dispatch passed ``num_worst_tokens``, else 0.
        plan: the transport's :class:`~deep_ep.transport.base.Plan`.
        owner: the id of the Buffer that made it.
        ident: the handle's identity, the same on every rank (the ranks compare it in each call).
    """

    rank_prefix_matrix: torch.Tensor
    is_token_in_rank: torch.Tensor
    num_recv_tokens: int
    num_worst_tokens: int
    plan: Plan
    owner: int
    ident: int = 0


class Buffer(EagerLanes):
    """The expert-parallel communication buffer (DeepEP v1 API; docs/api.md, Buffer).

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
        # The arguments are checked first and the verdicts exchanged (bounded) before any collective of the
        # construction, so a bad argument on one rank makes every rank raise instead of waiting.
        problem: Optional[BaseException] = None
        try:
            for name, v in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise DeepEPInputError(f"{name} must be a non-negative int, got {v!r}")
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
            self._wire = Wire.from_settings(self.settings)
            if backend != "auto":
                transport_class(backend)
        except (DeepEPInputError, ValueError, TypeError) as e:
            problem = e
        agree_verdicts(
            group, problem, "deep_ep.Buffer()", self.settings.timeout_s if problem is None else DEFAULT_TIMEOUT_S
        )
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
        self.ep_buffer_size = self.settings.ep_buffer_size
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
        # "comm waits for compute" and the reverse: two events recorded anew by every call
        self._cuda = self.device.type == "cuda"
        self._events = (torch.cuda.Event(), torch.cuda.Event()) if self._cuda else None

        gname = getattr(group, "group_name", None) or str(id(group))
        counter = _buffer_counter.setdefault(gname, itertools.count())
        self._uid = next(counter)
        self._init_lanes()
        self._waiter = Waiter(group, f"deep_ep/{gname}/buffer{self._uid}", self.timeout_s)
        self._transport: Transport = cls(group, self.device, self._waiter, self.settings, num_nvl_bytes)
        # on CPU ranks every call agrees on its arguments (gloo's collectives match up anyway), except on the
        # emulated nvlink's fused path, which runs as on the GPU (its checks ride in its kernels)
        check = self.settings.check_every_call
        self._check_every_call = (
            check if check is not None else (self.device.type != "cuda" and not self._transport.fused_plans)
        )
        self._local_buffers: Dict[bool, torch.Tensor] = {}
        self._zero_slots: Optional[torch.Tensor] = None
        self._checks = DeferredChecks()  # device-side verdicts of num_worst_tokens dispatches
        self._handles = itertools.count(1)  # handle identities (the same sequence on every rank)
        transport = self._transport
        self._low_latency = LowLatency(
            self, lambda: None if self._check_every_call else transport.low_latency_engine(self.num_rdma_bytes)
        )
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
            raise BufferDestroyedError(f"rank {self.rank}: this deep_ep.Buffer was destroyed")
        if self._waiter.broken:
            raise BufferDestroyedError(
                f"rank {self.rank}: this deep_ep.Buffer is unusable: an earlier call {self._waiter.broken}"
            )
        if self._checks.pending and not torch.cuda.is_current_stream_capturing():
            self._checks.raise_ready()  # verdicts of earlier num_worst_tokens dispatches
        if self._transport.fused_plans:
            self._transport.check_deferred()  # (the fused path's: read from pinned memory, no sync)

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
        self._low_latency.destroy()
        self._transport.destroy()
        self._local_buffers.clear()
        self._destroyed = True

    # ------------------------------------------------------------------ for the layers above
    def exchange_ints(self, values: torch.Tensor, stage: str) -> torch.Tensor:
        """All-gather a small int vector over the Buffer's group, bounded by ``timeout_s``.

        Collective: every rank calls it with a vector of the same length, at the same point.

        Args:
            values: int ``[n]`` (any device, any integer dtype).
            stage: what the exchange is for (named in a timeout's message).

        Returns:
            int64 ``[R, n]`` on the CPU: row ``r`` is rank ``r``'s ``values``.

        Raises:
            DeepEPTimeoutError: a rank did not arrive within ``timeout_s`` (named in the message).
        """
        self._check_alive()
        return self._transport.all_gather_ints(values.reshape(-1).to(torch.int64), stage)

    def abort_dispatch(self, error: BaseException) -> None:
        """Join, with ``error``, the fresh dispatch the other ranks of the group are making, so that every rank
        raises (this one ``error``, its message naming this rank; the others
        :class:`~deep_ep.errors.RemoteInputError` naming it) instead of leaving them waiting. For layers
        above the Buffer that find a bad argument before their dispatch. Never returns.

        Args:
            error: this rank's argument error.
        """
        self._check_alive()
        self._run_dispatch(DispatchRequest(problem=Problem(7, error), options=CallOptions(self.num_sms)))
        raise error  # pragma: no cover - the agreement raised

    @property
    def device_plans(self) -> bool:
        """Whether a ``num_worst_tokens`` dispatch of this Buffer builds its plan on the device (no host
        sync; its checks are deferred to the next call): the transport has a device path and the Buffer
        is not in checking mode (``DEEP_EP_CHECK``; CPU Buffers check by default)."""
        return self._transport.device_layout and not self._check_every_call

    @property
    def ranks_per_node(self) -> Optional[int]:
        """Ranks per node of a node-aware transport (``hierarchical``), else ``None``."""
        return self._transport.ranks_per_node

    @property
    def last_dispatch_stats(self) -> Optional[Dict[str, Any]]:
        """With ``compression_stats=True`` (env ``DEEP_EP_COMPRESSION_STATS=1``): the last dispatch's
        ``level``, ``row_bytes``, ``bf16_row_bytes``, ``bytes_on_wire`` (rows sent to other ranks x
        ``row_bytes``), ``rel_err_mean`` / ``rel_err_max`` (relative L2 error of the round trip of every
        row sent to at least one rank; see :meth:`deep_ep.wire.Wire.record`). Costs a host sync per
        dispatch; ``None`` when off."""
        return self._wire.last_stats

    def _ident(self) -> int:
        """The identity of this Buffer in a metadata header."""
        return self._uid

    # ------------------------------------------------------------------ layout
    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, EventOverlap]:
        """Tokens per rank / node / expert and the token-to-rank mask (docs/api.md, get_dispatch_layout). Local, no communication.

        Args:
            topk_idx: int64 ``[T, K]`` global expert ids, -1 = none.
            num_experts: ``E``, a positive multiple of the number of ranks.
            previous_event, async_finish, allocate_on_comm_stream: DeepEP's stream options.

        Returns:
            ``(num_tokens_per_rank int32 [R], num_tokens_per_rdma_rank int32 [nodes] or None,
            num_tokens_per_expert int32 [E], is_token_in_rank bool [T, R], event)``.
        """
        self._check_alive()
        key = None
        if previous_event is None and async_finish is False and allocate_on_comm_stream is False:
            key, got = self._eager_layout(topk_idx, num_experts)
            if got is not None:
                return got
        layout.num_local_experts(num_experts, self.num_ranks)
        opts, problem = parse_call_options(None, previous_event, async_finish, allocate_on_comm_stream, self.num_sms)
        try:
            if problem is not None:
                raise problem
            # Where the layout kernel runs, ids outside the range are dropped by it (no sync) and rejected by
            # dispatch; the torch path checks them here.
            on_cpu = not (isinstance(topk_idx, torch.Tensor) and kernels.available(topk_idx))
            validate.check_topk(
                topk_idx,
                num_experts,
                topk_idx.size(0) if isinstance(topk_idx, torch.Tensor) else -1,
                self.device,
                values="host" if on_cpu else "none",
            )
        except Problem as p:
            p.raise_on(self.rank)
        lane = None if on_cpu else self._keep_layout(key, topk_idx, num_experts)
        return self._layout_call(topk_idx, num_experts, lane, opts)

    def _layout_call(
        self, topk_idx: torch.Tensor, num_experts: int, lane: Optional[Callable], opts: Optional[CallOptions]
    ):
        """The layout of validated ``topk_idx`` on the comm stream: ``lane`` (the kernel prepared for its shape:
        :func:`deep_ep.kernels.layout.prepare`), or the torch path (``lane`` ``None``); ``opts`` ``None``:
        DeepEP's defaults (an eager call)."""
        if opts is None and self._plain_call is not None:
            call = self._plain_call
        else:
            call = StreamCall(self.device, self._comm_stream, opts or DEFAULT_OPTIONS, self._events)
        with call:
            if lane is None:
                got = layout.dispatch_layout_torch(
                    topk_idx, num_experts, self.num_ranks, self._transport.ranks_per_node
                )
            else:
                got = lane(topk_idx.contiguous())
            per_rank, per_node, per_expert, in_rank = got
            outs = [per_rank, per_expert, in_rank]
            if call.cuda and not call.on_comm:
                for t in outs:  # (made on the comm stream, used on the compute stream)
                    t.record_stream(call.compute)
        # without async_finish the compute stream waits for the comm stream: nothing else to keep alive
        event = call.finish([topk_idx] + outs) if call.async_finish else call.finish((), comm_made=[])
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
        """Send each token to every rank that hosts one of its experts (docs/api.md, dispatch).

        Args:
            x: bf16 (or float16/32/64) ``[T, H]``, or the pair (float8_e4m3fn ``[T, H]``, float32 scales
                ``[T, H // 128]``).
            handle: a handle of an earlier dispatch of this Buffer: a cached dispatch (no layout arguments).
            num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert: the layout
                (``get_dispatch_layout``'s outputs; ``num_tokens_per_expert`` gives ``E``).
            topk_idx: int64 ``[T, K]`` global expert ids (-1 = none); topk_weights: float32 ``[T, K]``.
            expert_alignment: each per-expert count is rounded up to it.
            num_worst_tokens: > 0: every output has that many rows and no host sync happens where the
                transport can (nvlink).
            config: a :class:`Config` (its ``num_sms``); previous_event, async_finish,
                allocate_on_comm_stream: DeepEP's stream options.
            compress: ``True`` = the Buffer's ``compression_level``, ``False`` = 16-bit, a level, or a
                float in (0, 1) = ``'auto'`` at that byte ratio (the same on every rank).
            return_compressed: leave ``recv_x`` encoded (:class:`~deep_ep.wire.CompressedRows`).

        Returns:
            ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event)``;
            with ``handle`` (cached dispatch) ``(recv_x, None, None, None, None, event)``. Received rows are
            grouped by source rank, then source token order; ``recv_topk_idx`` holds local expert ids (-1
            elsewhere). With ``compression_tolerance`` (``compress=True``) the ranks first agree on the
            call's ``'auto'`` upgrades from the rows they send (one extra host-synced exchange).
        """
        self._check_alive()
        key = None
        if (
            handle is None
            and config is None
            and previous_event is None
            and async_finish is False
            and allocate_on_comm_stream is False
            and compress is True
            and return_compressed is False
        ):  # an eager call as training makes it: parsed once per signature
            key, got = self._eager_dispatch(
                x,
                num_tokens_per_rank,
                is_token_in_rank,
                num_tokens_per_expert,
                topk_idx,
                topk_weights,
                expert_alignment,
                num_worst_tokens,
            )
            if got is not None:
                return got
        opts, problem = parse_call_options(config, previous_event, async_finish, allocate_on_comm_stream, self.num_sms)
        if handle is not None:
            req = self._parse_cached(
                x,
                handle,
                (num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights),
                compress,
                return_compressed,
                opts,
                problem,
            )
            return self._cached_dispatch(req)
        req = DispatchRequest.parse(
            x=x,
            num_tokens_per_rank=num_tokens_per_rank,
            is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_tokens_per_expert,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            expert_alignment=expert_alignment,
            num_worst_tokens=num_worst_tokens,
            compress=compress,
            return_compressed=return_compressed,
            options=opts,
            problem=problem,
            wire=self._wire,
            num_ranks=self.num_ranks,
            device=self.device,
            device_plans=self.device_plans,
        )
        if key is not None:
            self._keep_parsed(key, req)
        return self._run_dispatch(req)

    def _run_dispatch(self, req: DispatchRequest):
        """A fresh dispatch of a parsed request: agree, plan, move the rows (also the low-latency pair path's)."""
        self._waiter.seq += 1
        call = StreamCall(self.device, self._comm_stream, req.options, self._events)
        with call:
            t = self._transport
            if req.tolerance is None and req.codec is None and t.fused_takes_dispatch(req.num_experts):
                if req.problem is None and req.is_token_in_rank is None:  # top-k without the mask: the layout
                    _, _, req.num_tokens_per_expert, req.is_token_in_rank = layout.dispatch_layout(
                        req.topk_idx, req.num_experts, self.num_ranks, no_memset=True
                    )
                wait = req.problem is not None or self._fused_waits(req.num_worst_tokens)
                header = req.header(self._waiter.seq, self._ident())
                plan, L, expert_list = build_fused_plan(t, self.device, req, header, self._waiter.seq, wait)
            else:
                plan, L, expert_list = self._plan_dispatch(req)
            return self._finish_dispatch(call, plan, req, L, expert_list)

    def _new_handle(self, plan: Plan, num_worst_tokens: int) -> DispatchHandle:
        """The handle of a fresh dispatch by ``plan`` (this Buffer's, with a new identity)."""
        return DispatchHandle(
            plan.rank_prefix_matrix,
            plan.is_token_in_rank,
            plan.num_recv_tokens,
            num_worst_tokens,
            plan,
            self._uid,
            (self._uid << 40) | next(self._handles),
        )

    def _plan_dispatch(self, req: DispatchRequest) -> Tuple[Plan, int, Optional[List[int]]]:
        """The layout, the metadata the ranks exchange, and the plan of a fresh dispatch (inside its call)."""
        problem, E = req.problem, req.num_experts
        if problem is None:
            if req.is_token_in_rank is None:
                _, _, per_expert, req.is_token_in_rank = layout.dispatch_layout(req.topk_idx, E, self.num_ranks)
                req.num_tokens_per_expert = per_expert
            counts = req.is_token_in_rank.sum(dim=0, dtype=torch.int64)
        else:
            counts = torch.zeros((self.num_ranks,), dtype=torch.int64, device=self.device)
        if problem is None and req.topk_idx is not None and req.topk_idx.numel():
            id_range = torch.stack(torch.aminmax(req.topk_idx))
        else:
            id_range = torch.full((2,), -1, dtype=torch.int64, device=self.device)
        payload = [counts, id_range]
        # Transports whose exchange has fixed-size slots carry the expert counts in the same
        # exchange (ranks that disagree on num_experts cannot hang it). Others get a fixed number
        # of slots (_EXPERT_SLOTS, the same length on every rank whatever its input), which carry
        # the counts where num_experts fits; a larger num_experts needs a second exchange.
        merged = self._transport.fixed_slot_exchange
        has_pe = problem is None and req.topk_idx is not None
        if merged:
            if has_pe:
                payload.append(req.num_tokens_per_expert)
        else:
            if self._zero_slots is None:  # read-only padding, made once (a slice of it costs no kernel)
                self._zero_slots = torch.zeros((_EXPERT_SLOTS,), dtype=torch.int64, device=self.device)
            if has_pe and E <= _EXPERT_SLOTS:
                payload.append(req.num_tokens_per_expert)
                if E < _EXPERT_SLOTS:
                    payload.append(self._zero_slots[: _EXPERT_SLOTS - E])
            else:
                payload.append(self._zero_slots)
        header = req.header(self._waiter.seq, self._ident())
        if req.tolerance is not None:  # every rank of the call, bad input or not (see wire.agree_upgrades)
            req.codec = agree_upgrades(
                self._wire,
                self._transport,
                self.device,
                req.tolerance,
                req.codec,
                req.x,
                req.is_token_in_rank,
                header,
                payload,
                problem,
                DISPATCH_FIELDS,
            )
            header[_H_LEVEL] = Wire.header_code(req.codec)
        if req.num_worst_tokens > 0 and problem is None and self.device_plans:
            # Nothing read on the host: the plan stays on the device (capturable; checks deferred).
            plan = build_device_plan(
                self._transport,
                self._checks,
                header,
                payload,
                req.is_token_in_rank,
                req.num_tokens,
                req.num_worst_tokens,
                self._waiter.seq,
                torch.cuda.is_current_stream_capturing(),
            )
            return plan, (E // self.num_ranks if E > 0 else 0), []
        return build_host_plan(self._transport, self.device, req, header, payload, merged)

    def _finish_dispatch(
        self, call: StreamCall, plan: Plan, req: DispatchRequest, L: int, expert_list: Optional[List[int]]
    ):
        """Move the rows of a fresh dispatch (inside ``call``), localise the top-k ids, make the handle."""
        if plan.fused is not None:  # the data kernel localises the top-k ids itself (send side)
            recv = self._transport.fused_dispatch(
                plan, req.rows(), call.alloc, True, req.scales is not None, req.options.num_sms
            )
            recv_x = recv[0]
        else:
            recv, recv_x = self._move_rows(
                plan, req.rows(), call.alloc, req.codec, req.return_compressed, req.options.num_sms
            )
        record_dispatch(self._wire, req.codec, req.x, plan, self.rank)
        i = 1
        if req.scales is not None:
            recv_x = (recv[0], recv[1])
            i = 2
        recv_idx = recv_w = None
        if req.topk_idx is not None:
            if plan.fused is not None:
                recv_idx, recv_w = recv[i], (recv[i + 1] if req.topk_weights is not None else None)
            else:
                recv_idx, recv_w = localize_received(
                    plan, recv[i], recv[i + 1] if req.topk_weights is not None else None, self.rank, L
                )
        handle_out = self._new_handle(plan, req.num_worst_tokens)
        if plan.fused is not None and not call.async_finish:
            # the fused path allocates every output on the compute stream: nothing to record or keep
            event = call.finish((), comm_made=[])
        else:
            # every tensor the comm stream read or made stays alive for it (the caller may drop its references
            # at once: its memory must not return to the compute stream's pool before the comm stream's reads)
            made = [t for t in (recv_x, recv_idx, recv_w) if isinstance(t, torch.Tensor)]
            used = [req.x, req.scales, req.topk_idx, req.topk_weights, req.num_tokens_per_expert, plan.is_token_in_rank]
            event = call.finish(used + list(recv) + made, comm_made=[] if plan.fused is not None else None)
        return recv_x, recv_idx, recv_w, expert_list if expert_list is not None else [], handle_out, event

    def _move_rows(self, plan: Plan, rows: List[torch.Tensor], alloc, codec, return_compressed: bool, num_sms: int):
        """Dispatch ``rows`` by ``plan``; ``(received tensors, received x)``. With a codec ``rows[0]`` travels
        encoded: decoded by the transport (``dispatch_encoded``), or kept encoded (``return_compressed``)."""
        t = self._transport
        if codec is None:
            recv = t.dispatch(plan, rows, alloc, num_sms=num_sms)
            return recv, recv[0]
        if not return_compressed:
            recv = t.dispatch_encoded(plan, rows, alloc, codec, num_sms=num_sms)
            return recv, recv[0]
        recv = t.dispatch(plan, [codec.encode(rows[0])] + rows[1:], alloc, num_sms=num_sms)
        return recv, received_rows(codec, recv[0], rows[0].dtype, True)

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

    def _parse_cached(self, x, handle, layout_args, compress, return_compressed, opts, problem):
        return CachedDispatchRequest.parse(
            x,
            handle,
            layout_args,
            compress,
            return_compressed,
            opts,
            problem,
            self._wire,
            self.device,
            self._check_handle,
        )

    def _cached_dispatch(self, req: CachedDispatchRequest):
        self._waiter.seq += 1
        problem = req.problem
        call = StreamCall(self.device, self._comm_stream, req.options, self._events)
        with call:
            header = req.header(self._waiter.seq, req.handle.ident if req.handle is not None else 0)
            if req.tolerance is not None:  # every rank of the call, bad input or not (see wire.agree_upgrades)
                req.codec = agree_upgrades(
                    self._wire,
                    self._transport,
                    self.device,
                    req.tolerance,
                    req.codec,
                    req.x,
                    req.handle.plan.is_token_in_rank if problem is None else None,
                    header,
                    None,
                    problem,
                    _CACHED_FIELDS,
                )
                header[_H_LEVEL] = Wire.header_code(req.codec)
            if self._check_every_call:
                agree(self._transport, self.device, header, None, problem, _CACHED_FIELDS)
            elif problem is not None:
                problem.raise_on(self.rank)
            plan = req.handle.plan
            if plan.fused is not None and req.codec is None:
                recv = self._transport.fused_dispatch(
                    plan, req.rows(), call.alloc, False, req.scales is not None, req.options.num_sms
                )
                recv0 = recv[0]
            else:
                recv, recv0 = self._move_rows(
                    plan, req.rows(), call.alloc, req.codec, req.return_compressed, req.options.num_sms
                )
            record_dispatch(self._wire, req.codec, req.x, req.handle.plan, self.rank)
        event = call.finish(
            [req.x, req.scales] + list(recv) + ([recv0] if isinstance(recv0, torch.Tensor) else []),
            comm_made=[] if plan.fused is not None and req.codec is None else None,
        )
        recv_x = recv0 if req.scales is None else (recv[0], recv[1])
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
        """Send received rows back and reduce them per token (docs/api.md, combine).

        Args:
            x: ``[N, H]`` laid out as the dispatch's ``recv_x`` (N = received rows, or ``num_worst_tokens``).
            handle: the dispatch's handle.
            topk_weights: float32 ``[N, K]`` summed the same way, or ``None``.
            bias: 0, 1 or 2 tensors ``[T, H]`` added to the sums.
            config, previous_event, async_finish, allocate_on_comm_stream: as in :meth:`dispatch`.
            compress: ``True`` = the Buffer's ``combine_compression_level``, ``False`` = 16 bits, ``8``.

        Returns:
            ``(combined_x [T, H] of x.dtype, combined_topk_weights float32 [T, K] or None, event)``: for each
            original token, the float32 sum (float64 for float64 x) in rank order of the rows every rank
            returned for it, plus the biases. No routing weights are applied.
        """
        self._check_alive()
        opts, problem = parse_call_options(config, previous_event, async_finish, allocate_on_comm_stream, self.num_sms)
        return self._run_combine(self._parse_combine(x, handle, topk_weights, bias, compress, opts, problem))

    def _run_combine(self, req: CombineRequest):
        """A combine of a parsed request (also the low-latency pair path's)."""
        self._waiter.seq += 1
        call = StreamCall(self.device, self._comm_stream, req.options, self._events)
        with call:
            if self._check_every_call:
                header = req.header(self._waiter.seq, req.handle.ident if req.handle is not None else 0)
                agree(self._transport, self.device, header, None, req.problem, _COMBINE_FIELDS)
            elif req.problem is not None:
                req.problem.raise_on(self.rank)
            plan = req.handle.plan
            K = req.topk_weights.size(1) if req.topk_weights is not None else 0
            if plan.fused is not None and req.codec is None and self._transport.fused_takes_combine(plan, req.x, K):
                out, out_w = self._transport.fused_combine(
                    plan, req.x, req.topk_weights, req.biases, call.alloc, req.options.num_sms
                )
                event = call.finish([req.x, req.topk_weights, out, out_w] + req.biases, comm_made=[])
                return out, out_w, event
            out, out_w = self._transport.combine(
                req.handle.plan,
                req.x,
                req.topk_weights,
                req.biases,
                call.alloc,
                codec=req.codec,
                num_sms=req.options.num_sms,
            )
        event = call.finish([req.x, req.topk_weights, out, out_w] + req.biases)
        return out, out_w, event

    def _parse_combine(self, x, handle, topk_weights, bias, compress, opts, problem) -> CombineRequest:
        return CombineRequest.parse(
            x, handle, topk_weights, bias, compress, opts, problem, self._wire, self.device, self._check_handle
        )

    # ------------------------------------------------------------------ low-latency mode (docs/api.md, low-latency mode)
    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
        dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ):
        """Low-latency dispatch (docs/api.md, low-latency mode): fixed shapes, no host sync on nvlink (capturable).

        Args:
            x: bf16 ``[T, H]`` with ``T <= num_max_dispatch_tokens_per_rank``.
            topk_idx: int64 ``[T, K]`` global expert ids (-1 = none), distinct per token.
            num_max_dispatch_tokens_per_rank: ``M``, the same on every rank.
            num_experts: ``E``, a positive multiple of the number of ranks.
            cumulative_local_expert_recv_stats: int32 ``[L]`` incremented by the received counts, or ``None``.
            dispatch_wait_recv_cost_stats: accepted, left unchanged.
            use_fp8, round_scale, use_ue8m0: the wire format (fp8 with per-128 scales; UE8M0 scale bytes).
            async_finish: return an event; return_recv_hook: the call only sends, ``hook()`` receives.

        Returns:
            ``(recv_x, recv_count, handle, event, hook)``: ``recv_x`` is
            ``(float8_e4m3fn [L, R*M, H], float32 scales [L, R*M, H/128])`` (UE8M0: int32
            ``[L, R*M, H/512]``) or bf16 ``[L, R*M, H]`` without ``use_fp8``; the first ``recv_count[l]``
            rows of expert ``l`` are valid (source rank, then token order); ``recv_count`` int32 ``[L]``.
            See :mod:`deep_ep.low_latency` for how it differs from DeepEP's kernels.
        """
        self._check_alive()
        return self._low_latency.dispatch(
            x,
            topk_idx,
            num_max_dispatch_tokens_per_rank,
            num_experts,
            cumulative_local_expert_recv_stats,
            dispatch_wait_recv_cost_stats,
            use_fp8,
            round_scale,
            use_ue8m0,
            async_finish,
            return_recv_hook,
        )

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: Any,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: Optional[torch.Tensor] = None,
        combine_wait_recv_cost_stats: Optional[torch.Tensor] = None,
    ):
        """Low-latency combine (docs/api.md, low-latency mode).

        Args:
            x: bf16 ``[L, R*M, H]``, the experts' outputs in the dispatch's layout.
            topk_idx, topk_weights: ``[T, K]`` as dispatched, and the routing weights.
            handle: the low-latency dispatch's handle.
            use_logfmt: not supported (raises).
            zero_copy: read the buffer of :meth:`get_next_low_latency_combine_buffer` instead of ``x``.
            async_finish, return_recv_hook: as in :meth:`low_latency_dispatch`.
            out: bf16 ``[T, H]`` to write into, or ``None``.
            combine_wait_recv_cost_stats: accepted, left unchanged.

        Returns:
            ``(combined_x, event, hook)``: ``combined_x[t] = sum_k topk_weights[t, k] * x[expert k, slot of t]``
            (float32 sum, bf16 result; -1 entries skipped).
        """
        self._check_alive()
        return self._low_latency.combine(
            x,
            topk_idx,
            topk_weights,
            handle,
            use_logfmt,
            zero_copy,
            async_finish,
            return_recv_hook,
            out,
            combine_wait_recv_cost_stats,
        )

    def get_next_low_latency_combine_buffer(self, handle: Any) -> torch.Tensor:
        """The bf16 ``[L, R*M, H]`` buffer a ``zero_copy`` low-latency combine of ``handle`` reads: write the
        expert outputs into it, then call ``low_latency_combine(..., zero_copy=True)``."""
        return self._low_latency.next_combine_buffer(handle)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """DeepEP's buffer reset; deep_ep's low-latency calls keep no state between calls, so this only checks
        its arguments (as ``low_latency_dispatch`` does: positive ints, ``num_experts`` a positive multiple of
        the number of ranks)."""
        self._check_alive()
        self._low_latency.clean(num_max_dispatch_tokens_per_rank, hidden, num_experts)
