"""``ElasticBuffer``: DeepEP V2's expert-parallel API on deep_ep's transports (docs/api.md, ElasticBuffer).

Built on :class:`deep_ep.Buffer`'s public API alone. One fresh ``dispatch`` is:

1. ``get_dispatch_layout`` (local), then a Buffer dispatch of the rows with their
   top-k ids (worst-case sized with ``num_worst_tokens`` when ``do_cpu_sync`` is off);
2. a cached Buffer dispatch of a small metadata row per token (its global index and
   its top-k weights, as raw bits): every received row learns where it came from;
3. a Buffer dispatch in the other direction (one tiny row per received row, back to
   its source) that only creates the route ``combine`` uses, so that every combine is a
   cached, data-only Buffer dispatch;
4. local index work: expert counts and prefix sums, the expanded layout, V2's handle.

``combine`` sends one partial row per (token, rank) home (for the expanded layout
the rank first sums its rows of the token, in top-k order, as V2 does) and adds them
at home in V2's order, which makes the result bit-identical to V2's reference
(``deep_ep.utils.refs.combine``). Nothing is reduced in transit.

Bad input: every argument check runs before the first collective; a rank whose
input is bad makes its pending Buffer call fail on purpose, so the Buffer's metadata
agreement raises on every rank (naming the bad rank) and nothing hangs.
"""

from __future__ import annotations

import itertools
import logging
import socket
from typing import Any, List, NoReturn, Optional, Tuple, Union

import torch
import torch.distributed as dist

# Only deep_ep's public names (the package's top level): nothing private of Buffer is used.
from .. import Buffer, Config, topk_idx_t
from ..errors import BufferDestroyedError, DeepEPError, DeepEPInputError, DeepEPTypeError
from . import layout as lay
from . import reduce as red
from .events import ElasticEventOverlap, StreamScope, capture_event, check_event
from .extras import BUFFER_ALIGNMENT, ExtrasMixin
from .handle import EPHandle, RoutingState

log = logging.getLogger("deep_ep")

__all__ = ["ElasticBuffer"]

XType = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]

#: A handle no Buffer made: a cached Buffer dispatch with it fails, on every rank, in the metadata agreement.
_NOT_A_HANDLE = object()
_FLOAT_X = (torch.bfloat16, torch.float16, torch.float32)
_FP8 = tuple(d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d is not None)
_uids = itertools.count()


class _Wire:
    """How ``x`` travels through :class:`deep_ep.Buffer`: as is, as Buffer's fp8 pair, or as raw bytes."""

    def __init__(self, x: Any) -> None:
        self.values: torch.Tensor
        self.scales: Optional[torch.Tensor] = None
        self.mode = "plain"
        if isinstance(x, (tuple, list)):
            if len(x) != 2 or not all(isinstance(t, torch.Tensor) for t in x):
                raise DeepEPTypeError("x as a tuple must be (fp8 values [T, H], scale factors [T, S])")
            v, s = x
            if v.dim() != 2 or s.dim() != 2 or s.size(0) != v.size(0):
                raise DeepEPInputError(
                    f"x must be (values [T, H], scale factors [T, S]), got {list(v.shape)} and {list(s.shape)}"
                )
            if v.element_size() != 1 or s.element_size() != 4:
                raise DeepEPTypeError(
                    f"x as a pair must be 1-byte values (fp8) and 4-byte scale factors, got {v.dtype}, {s.dtype}"
                )
            self.values, self.scales = v, s
            H = v.size(1)
            native = v.dtype in _FP8 and s.dtype == torch.float32 and H % 128 == 0 and s.size(1) == H // 128
            self.mode = "pair" if native else "bytes"
        elif isinstance(x, torch.Tensor):
            if x.dim() != 2:
                raise DeepEPInputError(f"x must be 2-D [num_tokens, hidden], got shape {list(x.shape)}")
            self.values = x
        else:
            raise DeepEPTypeError(f"x must be a tensor or an (fp8, scale factors) pair, got {type(x).__name__}")

    @property
    def num_tokens(self) -> int:
        return self.values.size(0)

    def rows(self) -> XType:
        """What to hand to Buffer.dispatch."""
        if self.mode == "plain":
            return self.values
        if self.mode == "pair":
            return (self.values, self.scales)
        v = self.values.contiguous().view(torch.uint8)
        s = self.scales.contiguous().view(torch.uint8)
        nbytes = v.size(1) + s.size(1)
        packed = torch.zeros((v.size(0), lay.align_up(nbytes, 4)), dtype=torch.uint8, device=v.device)
        packed[:, : v.size(1)] = v
        packed[:, v.size(1) : nbytes] = s
        return packed.view(torch.float32)

    def unpack(self, received: XType) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(values, scales or None)`` of received rows."""
        if self.mode == "plain":
            return received, None
        if self.mode == "pair":
            return received[0], received[1]
        raw = received.contiguous().view(torch.uint8)
        H, S = self.values.size(1), self.scales.size(1) * 4
        v = raw[:, :H].contiguous().view(self.values.dtype)
        s = raw[:, H : H + S].contiguous().view(self.scales.dtype)
        return v, s


class ElasticBuffer(ExtrasMixin):
    """DeepEP V2's communication buffer on deep_ep's transports (docs/api.md, ElasticBuffer).

    Argument names, order and defaults are V2's. What deep_ep does with them:

    Args:
        group: the process group (NCCL on GPUs, gloo on CPU); ``None`` means the default group.
        num_bytes: V2's buffer size; recorded as ``num_bytes`` (deep_ep's transports size their staging
            themselves; bound it with the keyword ``num_nvl_bytes``). ``None``: :meth:`get_buffer_size_hint`.
        num_cpu_bytes: V2's host memory for Engram; no effect (Engram is not available).
        num_max_tokens_per_rank: the default per-rank token bound of :meth:`dispatch` (every rank must use
            the same); it numbers tokens globally and sizes worst-case outputs.
        hidden: for the size hint only.
        num_topk: for the size hint only.
        use_fp8_dispatch: for the size hint only (fp8 is chosen per call by passing an ``(x, sf)`` pair).
        deterministic: V2's deterministic mode. deep_ep's layouts are always deterministic (rows in source
            rank then source token order, also inside every expert's segment), so this changes nothing.
        allow_hybrid_mode: across nodes, use the hierarchical transport (one copy of a token per node) and
            V2's hybrid combine order (partials per scale-up domain rounded first); off: the flat transport.
        allow_multiple_reduction: V2's combine order for the expanded layout: a rank sums its rows of a
            token before sending (on), or sends every (token, expert) row home (off).
        prefer_overlap_with_compute: only changes :meth:`get_theoretical_num_sms`.
        sl_idx: V2's RDMA service level; no effect.
        num_allocated_qps: V2's RDMA queue pairs; recorded, no effect.
        num_cpu_timeout_secs: with ``num_gpu_timeout_secs``, the larger bounds every wait (Buffer's
            ``timeout_s``); on expiry an error names the ranks that did not arrive.
        num_gpu_timeout_secs: see ``num_cpu_timeout_secs``.
        explicitly_destroy: passed to the Buffer; call :meth:`destroy` to free resources early.
        backend: (deep_ep) force a transport: ``'collective'``, ``'nvlink'``, ``'hierarchical'``; ``None``
            lets ``allow_hybrid_mode`` decide (``'auto'``).
        ranks_per_node: (deep_ep) ranks per node of the hierarchical transport (emulates nodes on one host).
        num_nvl_bytes: (deep_ep) upper bound of the nvlink transport's staging memory (0: its default).
    """

    def __init__(
        self,
        group: Optional[dist.ProcessGroup],
        num_bytes: Optional[int] = None,
        num_cpu_bytes: int = 0,
        num_max_tokens_per_rank: int = 0,
        hidden: int = 0,
        num_topk: int = 0,
        use_fp8_dispatch: bool = False,
        deterministic: bool = False,
        allow_hybrid_mode: bool = True,
        allow_multiple_reduction: bool = True,
        prefer_overlap_with_compute: bool = True,
        sl_idx: int = 3,
        num_allocated_qps: int = 0,
        num_cpu_timeout_secs: int = 300,
        num_gpu_timeout_secs: int = 100,
        explicitly_destroy: bool = False,
        *,
        backend: Optional[str] = None,
        ranks_per_node: Optional[int] = None,
        num_nvl_bytes: int = 0,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise DeepEPError("deep_ep.ElasticBuffer needs torch.distributed initialised (init_process_group)")
        if group is None:
            group = dist.group.WORLD
        for name, value in (
            ("num_cpu_bytes", num_cpu_bytes),
            ("num_max_tokens_per_rank", num_max_tokens_per_rank),
            ("hidden", hidden),
            ("num_topk", num_topk),
            ("num_allocated_qps", num_allocated_qps),
            ("num_nvl_bytes", num_nvl_bytes),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DeepEPInputError(f"ElasticBuffer: {name} must be a non-negative int, got {value!r}")
        if num_bytes is not None and (not isinstance(num_bytes, int) or num_bytes < 0):
            raise DeepEPInputError(f"ElasticBuffer: num_bytes must be None or a non-negative int, got {num_bytes!r}")
        for name, value in (
            ("num_cpu_timeout_secs", num_cpu_timeout_secs),
            ("num_gpu_timeout_secs", num_gpu_timeout_secs),
        ):
            if not isinstance(value, (int, float)) or value <= 0:
                raise DeepEPInputError(f"ElasticBuffer: {name} must be positive, got {value!r}")

        self.group = group
        self.rank_idx = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.allow_hybrid_mode = bool(allow_hybrid_mode)
        self.allow_multiple_reduction = bool(allow_multiple_reduction)
        self.prefer_overlap_with_compute = bool(prefer_overlap_with_compute)
        self.deterministic = bool(deterministic)
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_cpu_bytes = num_cpu_bytes
        self.sl_idx = sl_idx
        self.num_allocated_qps = num_allocated_qps or (65 if self.allow_hybrid_mode else 17)
        self.explicitly_destroy = explicitly_destroy
        self.num_bytes = (
            num_bytes
            if num_bytes is not None
            else self._size_hint(
                self.num_ranks, num_max_tokens_per_rank, hidden, num_topk, use_fp8_dispatch, allow_multiple_reduction
            )
        )

        self.buffer = Buffer(
            group,
            num_nvl_bytes=num_nvl_bytes,
            explicitly_destroy=explicitly_destroy,
            backend=backend or "auto",
            compression_level=16,
            topology_aware=self.allow_hybrid_mode if backend is None else None,
            timeout_s=float(max(num_cpu_timeout_secs, num_gpu_timeout_secs)),
            ranks_per_node=ranks_per_node,
        )
        self.backend = self.buffer.backend
        self.device = self.buffer.device
        self._uid = next(_uids)
        self._destroyed = False
        self._extras_init()

        # Domains. Nodes as the transport sees them (emulated ones included): the layout of no tokens tells.
        probe = torch.zeros((0, 1), dtype=torch.int64, device=self.device)
        _, per_node, _, _, _ = self.buffer.get_dispatch_layout(probe, self.num_ranks)
        nodes = per_node.numel() if per_node is not None else 1
        if self.backend == "hierarchical":
            self.num_rdma_ranks, self.num_nvlink_ranks = nodes, self.num_ranks // nodes
        else:
            hosts: List[Optional[str]] = [None] * self.num_ranks
            dist.all_gather_object(hosts, socket.gethostname(), group=group)
            n_hosts = len(set(hosts))
            ok = self.num_ranks % n_hosts == 0
            self.num_rdma_ranks, self.num_nvlink_ranks = (
                (n_hosts, self.num_ranks // n_hosts) if ok else (1, self.num_ranks)
            )
        if self.allow_hybrid_mode and self.backend == "hierarchical" and nodes > 1:
            self.num_scaleout_ranks, self.num_scaleup_ranks = nodes, self.num_ranks // nodes
        else:
            self.num_scaleout_ranks, self.num_scaleup_ranks = 1, self.num_ranks
        self.scaleout_rank_idx = self.rank_idx // self.num_scaleup_ranks
        self.scaleup_rank_idx = self.rank_idx % self.num_scaleup_ranks
        log.debug(
            "deep_ep.ElasticBuffer rank %d/%d on %s: logical %dx%d, physical %dx%d",
            self.rank_idx,
            self.num_ranks,
            self.backend,
            self.num_scaleout_ranks,
            self.num_scaleup_ranks,
            self.num_rdma_ranks,
            self.num_nvlink_ranks,
        )

    # ------------------------------------------------------------------ sizes, domains, SMs
    @staticmethod
    def _size_hint(R: int, M: int, hidden: int, num_topk: int, fp8: bool, multiple_reduction: bool) -> int:
        per_row = (hidden + (hidden // 128) * 4 if fp8 else hidden * 2) + num_topk * 12 + 16
        combine = hidden * 2 * (1 if multiple_reduction else max(num_topk, 1))
        return lay.align_up(max(R * M * (per_row + combine), 1), BUFFER_ALIGNMENT)

    @staticmethod
    def get_buffer_size_hint(
        group: dist.ProcessGroup,
        num_max_tokens_per_rank: int,
        hidden: int,
        num_topk: int = 0,
        use_fp8_dispatch: bool = False,
        allow_hybrid_mode: bool = True,
        allow_multiple_reduction: bool = True,
    ) -> int:
        """Bytes of the worst-case outputs of one dispatch and one combine, rounded up to 2 MiB.

        deep_ep allocates outputs per call (it has no fixed V2 buffer), so this is an estimate for callers
        that size or compare buffers by it (V2's README pattern keeps working).

        Args:
            group: the communication group.
            num_max_tokens_per_rank: the per-rank token bound.
            hidden: values per token.
            num_topk: K.
            use_fp8_dispatch: fp8 values plus one float32 scale per 128 values instead of bf16.
            allow_hybrid_mode: V2's argument (no effect on the estimate).
            allow_multiple_reduction: off: the expanded combine sends one row per (token, expert).

        Returns:
            Bytes (int, a multiple of 2 MiB).
        """
        R = dist.get_world_size(group)
        return ElasticBuffer._size_hint(
            R, num_max_tokens_per_rank, hidden, num_topk, use_fp8_dispatch, allow_multiple_reduction
        )

    def get_physical_domain_size(self) -> Tuple[int, int]:
        """``(num_rdma_ranks, num_nvlink_ranks)``: nodes and ranks per node (the hierarchical transport's
        nodes, emulated ones included; else by host name).

        Returns:
            Two ints.
        """
        return self.num_rdma_ranks, self.num_nvlink_ranks

    def get_logical_domain_size(self) -> Tuple[int, int]:
        """``(num_scaleout_ranks, num_scaleup_ranks)``: ``(nodes, ranks per node)`` in hybrid mode (hierarchical
        transport across nodes), else ``(1, num_ranks)``.

        Returns:
            Two ints.
        """
        return self.num_scaleout_ranks, self.num_scaleup_ranks

    def get_theoretical_num_sms(
        self,
        num_experts: int,
        num_topk: int,
        num_scaleout_topk: int = 0,
        rdma_gbs: float = 0,
        nvlink_gbs: float = 0,
        sm_read_gbs: float = 200,
        sm_write_gbs: float = 50,
    ) -> int:
        """The SM count to pass as ``num_sms``: :attr:`deep_ep.Buffer.num_sms` (the persistent programs of the
        nvlink kernels), doubled without ``prefer_overlap_with_compute``, at most the device's SMs. V2's
        bandwidth model has nothing to tune here (the other arguments are accepted and unused).

        Args:
            num_experts: E.
            num_topk: K.
            num_scaleout_topk: V2's argument.
            rdma_gbs: V2's argument.
            nvlink_gbs: V2's argument.
            sm_read_gbs: V2's argument.
            sm_write_gbs: V2's argument.

        Returns:
            An even int >= 2.
        """
        n = Buffer.num_sms if self.prefer_overlap_with_compute else 2 * Buffer.num_sms
        if self.device.type == "cuda":
            n = min(n, torch.cuda.get_device_properties(self.device).multi_processor_count)
        return max(2, n - n % 2)

    def get_theoretical_num_qps(self, num_sms: int) -> int:
        """V2's QP count for ``num_sms`` (no effect here): ``min(num_sms + 1, num_allocated_qps)``.

        Args:
            num_sms: the SM count.

        Returns:
            An int.
        """
        return min(num_sms + 1, self.num_allocated_qps)

    # ------------------------------------------------------------------ streams, barrier, lifetime
    @staticmethod
    def capture() -> ElasticEventOverlap:
        """An event on the current CUDA stream, for ``previous_event`` (empty on CPU).

        Returns:
            :class:`~deep_ep.elastic.events.ElasticEventOverlap`.
        """
        return capture_event()

    def get_comm_stream(self) -> Optional[torch.cuda.Stream]:
        """The stream the calls' communication runs on (``None`` on CPU).

        Returns:
            A ``torch.cuda.Stream`` or ``None``.
        """
        self._check_usable("get_comm_stream")
        return self.buffer.get_comm_stream()

    def barrier(self, use_comm_stream: bool = True, with_cpu_sync: bool = False, sequential: bool = True) -> None:
        """Wait until every rank of the group gets here (a one-element all-reduce on the group).

        Args:
            use_comm_stream: on CUDA, run it on the communication stream (the current stream waits for it).
            with_cpu_sync: on CUDA, also synchronise the device before and after.
            sequential: V2's argument (no effect).
        """
        self._check_usable("barrier")
        cuda = self.device.type == "cuda"
        if cuda and with_cpu_sync:
            torch.cuda.synchronize(self.device)
        token = torch.zeros((1,), dtype=torch.int32, device=self.device)
        comm = self.buffer.get_comm_stream() if cuda and use_comm_stream else None
        if comm is not None:
            comm.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(comm):
                dist.all_reduce(token, group=self.group)
            torch.cuda.current_stream(self.device).wait_stream(comm)
        else:
            dist.all_reduce(token, group=self.group)
        if cuda and with_cpu_sync:
            torch.cuda.synchronize(self.device)

    def destroy(self) -> None:
        """Release the buffer (idempotent); later calls raise :class:`deep_ep.errors.BufferDestroyedError`."""
        if self._destroyed:
            return
        self._extras_destroy()
        self.buffer.destroy()
        self._destroyed = True

    def _check_usable(self, op: str) -> None:
        if self._destroyed:
            raise BufferDestroyedError(f"ElasticBuffer.{op} on rank {self.rank_idx}: the buffer was destroyed")

    # ------------------------------------------------------------------ errors that every rank sees
    def _raise_here(self, op: str, exc: BaseException) -> NoReturn:
        """Re-raise ``exc`` with this call and this rank named (the type is kept)."""
        cls = (
            type(exc)
            if isinstance(exc, DeepEPError)
            else DeepEPTypeError
            if isinstance(exc, TypeError)
            else DeepEPInputError
        )
        raise cls(f"ElasticBuffer.{op} on rank {self.rank_idx}: {exc}") from exc

    def _fail_everywhere(self, op: str, exc: BaseException, cached: bool) -> NoReturn:
        """This rank's input is bad: join the Buffer call the other ranks are in with an argument that fails
        its agreement (so they raise too, naming this rank), then raise ``exc`` here."""
        try:
            if cached:
                self.buffer.dispatch(None, handle=_NOT_A_HANDLE, compress=False)
            else:
                self.buffer.dispatch(None, expert_alignment=0, compress=False)
        except DeepEPError:
            pass
        self._raise_here(op, exc)

    def _v1(self, op: str, fn, *args, **kwargs):
        """A Buffer call whose errors name the ElasticBuffer call and this rank."""
        try:
            return fn(*args, **kwargs)
        except DeepEPError as exc:
            self._raise_here(op, exc)

    # ------------------------------------------------------------------ argument checks (local, no communication)
    def _config(self, num_sms: int) -> Optional[Config]:
        if not isinstance(num_sms, int) or num_sms < 0:
            raise DeepEPInputError(f"num_sms must be an int >= 0, got {num_sms!r}")
        return Config(num_sms=num_sms + num_sms % 2) if num_sms > 0 else None

    def _check_on_device(self, t: torch.Tensor, what: str) -> None:
        if t.device.type != self.device.type or (t.is_cuda and t.device.index != self.device.index):
            raise DeepEPInputError(f"{what} is on {t.device}, the group works on {self.device}")

    def _check_stats(self, stats: Optional[torch.Tensor], L: int) -> None:
        if stats is None:
            return
        if not isinstance(stats, torch.Tensor) or stats.dtype != torch.int32 or tuple(stats.shape) != (L,):
            raise DeepEPInputError(
                f"cumulative_local_expert_recv_stats must be an int32 tensor [{L}] (num_local_experts), got "
                f"{getattr(stats, 'dtype', type(stats).__name__)} {list(getattr(stats, 'shape', []))}"
            )
        self._check_on_device(stats, "cumulative_local_expert_recv_stats")

    def _check_weights(self, w: Optional[torch.Tensor], shape: Tuple[int, ...], what: str) -> Optional[torch.Tensor]:
        if w is None:
            return None
        if not isinstance(w, torch.Tensor) or w.dtype != torch.float32:
            raise DeepEPTypeError(f"{what} must be a float32 tensor, got {getattr(w, 'dtype', type(w).__name__)}")
        if tuple(w.shape) != tuple(shape):
            raise DeepEPInputError(f"{what} must have shape {list(shape)}, got {list(w.shape)}")
        self._check_on_device(w, what)
        return w.contiguous()

    def _handle_state(self, handle: Any) -> RoutingState:
        if not isinstance(handle, EPHandle) or handle._state is None:
            raise DeepEPTypeError(
                f"handle must be an EPHandle from ElasticBuffer.dispatch, got {type(handle).__name__}"
            )
        if handle._state.owner != self._uid:
            raise DeepEPInputError("handle was made by another ElasticBuffer")
        return handle._state

    # ------------------------------------------------------------------ dispatch
    def dispatch(
        self,
        x: XType,
        topk_idx: Optional[torch.Tensor] = None,
        topk_weights: Optional[torch.Tensor] = None,
        cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
        num_experts: Optional[int] = None,
        num_max_tokens_per_rank: Optional[int] = None,
        expert_alignment: Optional[int] = None,
        num_sms: int = 0,
        num_qps: int = 0,
        previous_event: Optional[Any] = None,
        previous_event_before_epilogue: Optional[Any] = None,
        async_with_compute_stream: bool = False,
        allocate_on_comm_stream: bool = False,
        handle: Optional[EPHandle] = None,
        do_handle_copy: bool = True,
        do_cpu_sync: Optional[bool] = None,
        do_expand: bool = False,
        do_zero_padding: bool = False,
        use_tma_aligned_col_major_sf: bool = False,
    ) -> Tuple[XType, Optional[torch.Tensor], Optional[torch.Tensor], EPHandle, ElasticEventOverlap]:
        """Send every token to each rank that owns one of its experts (DeepEP V2 semantics).

        Args:
            x: bf16 ``[T, H]`` (or float16/float32), or a pair (fp8 ``[T, H]``, 4-byte scale factors
                ``[T, S]``: float32 ``[T, H / 128]`` travels as Buffer's fp8 pair, any other, e.g. packed
                UE8M0 int32, as raw bytes).
            topk_idx: ``deep_ep.topk_idx_t`` (int64) ``[T, K]`` global expert ids, -1 for none. ``None`` with
                ``handle``.
            topk_weights: float32 ``[T, K]`` or ``None``.
            cumulative_local_expert_recv_stats: int32 ``[L]``; the (token, local expert) counts received are
                added to it.
            num_experts: E (from ``handle`` if given).
            num_max_tokens_per_rank: M, the same on every rank, ``T <= M`` (default: the constructor's).
            expert_alignment: each local expert's row count is rounded up to a multiple of it (default 1).
            num_sms: SMs for the transport's kernels (0: :meth:`get_theoretical_num_sms`).
            num_qps: V2's QP count (no effect).
            previous_event: the work waits for this event (from :meth:`capture`) instead of the current stream.
            previous_event_before_epilogue: the local layout work after the exchange also waits for it.
            async_with_compute_stream: return at once with an event (``event.current_stream_wait()``).
            allocate_on_comm_stream: outputs belong to the communication stream.
            handle: an :class:`EPHandle` to reuse (cached dispatch: ``topk_idx`` must be ``None``;
                ``topk_weights`` may be sent along).
            do_handle_copy: store a copy of ``topk_idx`` in the handle (else the caller's tensor).
            do_cpu_sync: exact output sizes (reads the counts on the host); ``False``: worst-case sizes, no
                host wait. ``None``: ``True``, or ``False`` with ``handle``.
            do_expand: the expanded layout (one row per (token, local expert), grouped by expert, each expert's
                segment starting at a multiple of ``expert_alignment``).
            do_zero_padding: (expanded) zero the alignment padding rows (deep_ep always does).
            use_tma_aligned_col_major_sf: received scale factors column-major, column stride rounded up to 4.

        Returns:
            ``(recv_x, recv_topk_idx, recv_topk_weights, handle, event)``. Non-expanded: ``recv_x`` ``[N, H]``
            (or the pair), rows by source rank then source token; ``recv_topk_idx`` int64 ``[N, K]`` local ids
            (-1 where the expert is elsewhere); ``recv_topk_weights`` float32 ``[N, K]``, the token's weights as
            sent. Expanded: ``recv_x`` ``[Ne, H]``, ``recv_topk_idx`` ``None``, ``recv_topk_weights`` float32
            ``[Ne]``. Without ``do_cpu_sync``, ``N = num_ranks * M`` and ``Ne`` is the worst case; the real
            counts are in ``handle.psum_num_recv_tokens_per_scaleup_rank[-1]`` and
            ``handle.psum_num_recv_tokens_per_expert``, padding rows are zero (top-k ids -1).
        """
        self._check_usable("dispatch")
        if handle is not None:
            return self._cached_dispatch(
                x,
                topk_idx,
                topk_weights,
                cumulative_local_expert_recv_stats,
                num_experts,
                num_max_tokens_per_rank,
                expert_alignment,
                num_sms,
                previous_event,
                previous_event_before_epilogue,
                async_with_compute_stream,
                allocate_on_comm_stream,
                handle,
                do_cpu_sync,
                do_expand,
                do_zero_padding,
                use_tma_aligned_col_major_sf,
            )
        buf, R, me, dev = self.buffer, self.num_ranks, self.rank_idx, self.device
        scope = StreamScope(
            dev, buf.get_comm_stream(), previous_event, async_with_compute_stream, allocate_on_comm_stream
        )
        with scope:
            scope.keep_inputs(x, topk_idx, topk_weights, cumulative_local_expert_recv_stats)
            try:
                check_event(previous_event, "previous_event")
                check_event(previous_event_before_epilogue, "previous_event_before_epilogue")
                wire = _Wire(x)
                T = wire.num_tokens
                if topk_idx is None:
                    raise DeepEPInputError("dispatch needs topk_idx (or a handle for a cached dispatch)")
                if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype != topk_idx_t or topk_idx.dim() != 2:
                    raise DeepEPTypeError(
                        f"topk_idx must be a 2-D {topk_idx_t} tensor (deep_ep.topk_idx_t), got "
                        f"{getattr(topk_idx, 'dtype', type(topk_idx).__name__)} {list(getattr(topk_idx, 'shape', []))}"
                    )
                if topk_idx.size(0) != T:
                    raise DeepEPInputError(f"topk_idx has {topk_idx.size(0)} rows but x has {T} tokens")
                K = topk_idx.size(1)
                if K < 1:
                    raise DeepEPInputError("topk_idx needs at least one column")
                if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts <= 0:
                    raise DeepEPInputError(f"num_experts must be a positive int, got {num_experts!r}")
                if num_experts % R != 0:
                    raise DeepEPInputError(f"num_experts={num_experts} is not a multiple of the {R} ranks")
                L = num_experts // R
                M = num_max_tokens_per_rank if num_max_tokens_per_rank is not None else self.num_max_tokens_per_rank
                if not isinstance(M, int) or M <= 0:
                    raise DeepEPInputError(
                        "num_max_tokens_per_rank must be a positive int (pass it to ElasticBuffer(...) or to "
                        f"dispatch), got {M!r}"
                    )
                if T > M:
                    raise DeepEPInputError(f"x has {T} tokens, more than num_max_tokens_per_rank={M}")
                a = 1 if expert_alignment is None else expert_alignment
                if not isinstance(a, int) or isinstance(a, bool) or a < 1:
                    raise DeepEPInputError(f"expert_alignment must be an int >= 1, got {expert_alignment!r}")
                if do_zero_padding and not do_expand:
                    raise DeepEPInputError("do_zero_padding needs do_expand=True")
                sync = True if do_cpu_sync is None else bool(do_cpu_sync)
                weights = self._check_weights(topk_weights, (T, K), "topk_weights")
                self._check_stats(cumulative_local_expert_recv_stats, L)
                cfg = self._config(num_sms)
                if R * M >= 2**31:
                    raise DeepEPInputError(f"num_ranks * num_max_tokens_per_rank = {R * M} does not fit in int32")
                per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, num_experts)
            except (DeepEPError, ValueError, TypeError) as exc:
                self._fail_everywhere("dispatch", exc, cached=False)

            # 1. the rows, with their top-k ids (Buffer localises them).
            worst = R * M
            recv_rows, recv_idx, _, aligned_list, forward, _ = self._v1(
                "dispatch",
                buf.dispatch,
                wire.rows(),
                num_tokens_per_rank=per_rank,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert,
                topk_idx=topk_idx,
                expert_alignment=a,
                num_worst_tokens=0 if sync else worst,
                config=cfg,
                compress=False,
            )
            n = recv_idx.size(0)
            # 2. per token: global index and weights (raw bits), along the same routes.
            cols = [(me * M + torch.arange(T, dtype=torch.int64, device=dev)).to(torch.int32).unsqueeze(1)]
            if weights is not None:
                cols.append(weights.view(torch.int32))
            meta = torch.cat(cols, dim=1).view(torch.float32)
            recv_meta = self._v1("dispatch", buf.dispatch, meta, handle=forward, config=cfg, compress=False)[0]
            recv_meta = recv_meta.contiguous().view(torch.int32)
            scope.wait_before_epilogue(previous_event_before_epilogue)

            counts = lay.source_counts(forward[0], me)
            src_rank, valid = lay.row_sources(counts, n)
            # 3. the route home (one row per received row), so that combines are data-only.
            back_mask = src_rank.unsqueeze(1) == torch.arange(R, dtype=torch.int64, device=dev).unsqueeze(0)
            home_worst = 0 if sync else max(1, T * min(K, R))
            backward_rows = self._v1(
                "dispatch",
                buf.dispatch,
                torch.zeros((n, 1), dtype=torch.float32, device=dev),
                is_token_in_rank=back_mask,
                num_worst_tokens=home_worst,
                compress=False,
            )[4]

            # 4. the layouts.
            recv_x, recv_sf = wire.unpack(recv_rows)
            recv_w = recv_meta[:, 1:].contiguous().view(torch.float32) if weights is not None else None
            ecount = lay.expert_counts(recv_idx, L)
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats.add_(ecount.to(torch.int32))
            Ne = sum(aligned_list) if sync else lay.worst_expanded_rows(R, M, K, L, a)
            psum_expert, starts = lay.expert_psum(ecount, a, do_expand)
            P = self.num_scaleup_ranks
            minus1 = torch.full((n,), -1, dtype=torch.int64, device=dev)
            col0 = torch.where(valid, recv_meta[:, 0].to(torch.int64), minus1)
            col1 = torch.where(valid, (src_rank % P) * K + lay.master_topk(recv_idx), minus1)
            slot = slot_pair = None
            backward_pairs = home_pairs = None
            if do_expand:
                slot = lay.expand_slots(recv_idx, ecount, starts)
                slot_pair = lay.slot_pairs(slot, Ne)
                row_of = torch.where(slot_pair >= 0, slot_pair // K, torch.full_like(slot_pair, -1))
                out_x = lay.gather_rows(recv_x, row_of)
                out_sf = lay.gather_rows(recv_sf, row_of, use_tma_aligned_col_major_sf) if recv_sf is not None else None
                out_idx = None
                out_w = None
                if recv_w is not None:
                    out_w = lay.gather_rows(recv_w.reshape(-1, 1), slot_pair)[:, 0]
                slot_cols = slot
                if not self.allow_multiple_reduction:  # every expanded row goes home on its own
                    pair_src = torch.where(
                        row_of >= 0, src_rank.index_select(0, row_of.clamp(min=0)) if n else row_of, row_of
                    )
                    pair_mask = pair_src.unsqueeze(1) == torch.arange(R, dtype=torch.int64, device=dev).unsqueeze(0)
                    backward_pairs = self._v1(
                        "dispatch",
                        buf.dispatch,
                        torch.zeros((Ne, 1), dtype=torch.float32, device=dev),
                        is_token_in_rank=pair_mask,
                        num_worst_tokens=0 if sync else max(1, T * K),
                        compress=False,
                    )[4]
                    home_pairs = lay.home_pair_positions(topk_idx)
            else:
                out_x, out_idx, out_w = recv_x, recv_idx, recv_w
                out_sf = lay.to_col_major(recv_sf) if recv_sf is not None and use_tma_aligned_col_major_sf else recv_sf
                slot_cols = torch.full((n, K), -1, dtype=torch.int64, device=dev)
            slot_cols = torch.where(valid.unsqueeze(1), slot_cols, torch.full_like(slot_cols, -1))
            metadata = torch.cat([col0.unsqueeze(1), col1.unsqueeze(1), slot_cols], dim=1).to(torch.int32)
            prefix_before = (
                forward[0][me - 1].to(torch.int64) if me > 0 else torch.zeros((R,), dtype=torch.int64, device=dev)
            )
            owner = torch.where(topk_idx >= 0, topk_idx // L, torch.full_like(topk_idx, -1))
            new_handle = EPHandle(
                do_expand,
                num_experts,
                a,
                M,
                num_sms if num_sms > 0 else self.get_theoretical_num_sms(num_experts, K),
                topk_idx.clone() if do_handle_copy else topk_idx,
                n,
                Ne,
                list(aligned_list) if sync else [],
                lay.scaleup_psum(counts, P),
                psum_expert,
                ecount.to(torch.int32),
                metadata,
                lay.sender_slots(in_rank, prefix_before, topk_idx, L),
            )
            new_handle._state = RoutingState(
                owner=self._uid,
                forward=forward,
                backward_rows=backward_rows,
                backward_pairs=backward_pairs,
                recv_topk_idx=recv_idx.clone(),
                slot=slot,
                slot_pair=slot_pair,
                expert_counts=ecount,
                row_src_rank=src_rank,
                home_rows=lay.home_row_positions(in_rank),
                home_pairs=home_pairs,
                owner_rank=owner,
                num_tokens=T,
                num_rows=n,
                num_expanded_rows=Ne if do_expand else 0,
                synced=sync,
            )
            out = (out_x, out_sf) if out_sf is not None else out_x
        event = scope.finish([out, out_idx, out_w, metadata, new_handle.psum_num_recv_tokens_per_expert])
        return out, out_idx, out_w, new_handle, event

    def _cached_dispatch(
        self,
        x,
        topk_idx,
        topk_weights,
        stats,
        num_experts,
        num_max_tokens_per_rank,
        expert_alignment,
        num_sms,
        previous_event,
        previous_event_before_epilogue,
        async_with_compute_stream,
        allocate_on_comm_stream,
        handle,
        do_cpu_sync,
        do_expand,
        do_zero_padding,
        use_tma_aligned_col_major_sf,
    ):
        buf, dev = self.buffer, self.device
        scope = StreamScope(
            dev, buf.get_comm_stream(), previous_event, async_with_compute_stream, allocate_on_comm_stream
        )
        with scope:
            scope.keep_inputs(x, topk_weights, stats)
            try:
                check_event(previous_event, "previous_event")
                check_event(previous_event_before_epilogue, "previous_event_before_epilogue")
                state = self._handle_state(handle)
                if topk_idx is not None:
                    raise DeepEPInputError("a cached dispatch (handle given) takes topk_idx from the handle: pass None")
                if do_cpu_sync:
                    raise DeepEPInputError("a cached dispatch cannot do_cpu_sync: its sizes come from the handle")
                for name, given, have in (
                    ("num_experts", num_experts, handle.num_experts),
                    ("expert_alignment", expert_alignment, handle.expert_alignment),
                    ("num_max_tokens_per_rank", num_max_tokens_per_rank, handle.num_max_tokens_per_rank),
                ):
                    if given is not None and given != have:
                        raise DeepEPInputError(f"{name}={given!r} differs from the handle's {have!r}")
                if bool(do_expand) != bool(handle.do_expand):
                    raise DeepEPInputError(
                        f"do_expand={bool(do_expand)} but the handle was made with do_expand={handle.do_expand}"
                    )
                if do_zero_padding and not do_expand:
                    raise DeepEPInputError("do_zero_padding needs do_expand=True")
                wire = _Wire(x)
                if wire.num_tokens != state.num_tokens:
                    raise DeepEPInputError(
                        f"x has {wire.num_tokens} tokens but the handle was made for {state.num_tokens}"
                    )
                K = state.recv_topk_idx.size(1)
                weights = self._check_weights(topk_weights, (state.num_tokens, K), "topk_weights")
                self._check_stats(stats, state.expert_counts.numel())
                cfg = self._config(num_sms)
            except (DeepEPError, ValueError, TypeError) as exc:
                self._fail_everywhere("dispatch", exc, cached=True)
            recv_rows = self._v1(
                "dispatch", buf.dispatch, wire.rows(), handle=state.forward, config=cfg, compress=False
            )[0]
            recv_w = None
            if weights is not None:
                recv_w = self._v1("dispatch", buf.dispatch, weights, handle=state.forward, config=cfg, compress=False)[
                    0
                ]
            scope.wait_before_epilogue(previous_event_before_epilogue)
            if stats is not None:
                stats.add_(state.expert_counts.to(torch.int32))
            recv_x, recv_sf = wire.unpack(recv_rows)
            if handle.do_expand:
                row_of = torch.where(state.slot_pair >= 0, state.slot_pair // K, torch.full_like(state.slot_pair, -1))
                out_x = lay.gather_rows(recv_x, row_of)
                out_sf = lay.gather_rows(recv_sf, row_of, use_tma_aligned_col_major_sf) if recv_sf is not None else None
                out_w = lay.gather_rows(recv_w.reshape(-1, 1), state.slot_pair)[:, 0] if recv_w is not None else None
                out_idx = None
            else:
                out_x, out_w = recv_x, recv_w
                out_sf = lay.to_col_major(recv_sf) if recv_sf is not None and use_tma_aligned_col_major_sf else recv_sf
                out_idx = state.recv_topk_idx.clone()
            out = (out_x, out_sf) if out_sf is not None else out_x
        event = scope.finish([out, out_idx, out_w])
        return out, out_idx, out_w, handle, event

    # ------------------------------------------------------------------ combine
    def combine(
        self,
        x: torch.Tensor,
        handle: EPHandle,
        topk_weights: Optional[torch.Tensor] = None,
        bias: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], None] = None,
        num_sms: int = 0,
        num_qps: int = 0,
        previous_event: Optional[Any] = None,
        previous_event_before_epilogue: Optional[Any] = None,
        async_with_compute_stream: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], ElasticEventOverlap]:
        """Bring the expert outputs home and add them per token, in DeepEP V2's order.

        For every token: start from the bias (float32 sum of 0, 1 or 2 tensors), then add each rank's partial
        in the order of the token's top-k slots (a rank at its last slot); in hybrid mode the partials of one
        scale-up domain are summed (float32) and rounded first. Expanded layout with
        ``allow_multiple_reduction``: a rank's partial is the float32 sum of its rows of the token in top-k
        order, rounded to ``x.dtype``; without it every (token, expert) row is added in top-k order. No routing
        weights are applied.

        Args:
            x: ``[N, H]`` (non-expanded, laid out as ``recv_x``) or ``[Ne, H]`` (expanded) bf16 (or float16/32).
            handle: the :class:`EPHandle` of the dispatch.
            topk_weights: non-expanded float32 ``[N, K]``; expanded float32 ``[Ne]``; or ``None``.
            bias: ``None``, a ``[T, H]`` tensor, or a pair of them.
            num_sms: SMs for the transport's kernels (0: the handle's).
            num_qps: V2's QP count (no effect).
            previous_event: the work waits for this event instead of the current stream.
            previous_event_before_epilogue: the home-side reduction also waits for it.
            async_with_compute_stream: return at once with an event.
            allocate_on_comm_stream: outputs belong to the communication stream.

        Returns:
            ``(combined_x [T, H] of x.dtype, combined_topk_weights float32 [T, K] or None, event)``: slot
            ``(t, k)`` of the weights is the value the rank owning its expert sent back (0 where the id is -1).
        """
        self._check_usable("combine")
        buf, dev = self.buffer, self.device
        scope = StreamScope(
            dev, buf.get_comm_stream(), previous_event, async_with_compute_stream, allocate_on_comm_stream
        )
        with scope:
            scope.keep_inputs(x, topk_weights, bias)
            biases: List[torch.Tensor] = []
            try:
                check_event(previous_event, "previous_event")
                check_event(previous_event_before_epilogue, "previous_event_before_epilogue")
                state = self._handle_state(handle)
                rows = state.num_expanded_rows if handle.do_expand else state.num_rows
                if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_X:
                    raise DeepEPTypeError(
                        f"combine x must be a bfloat16 (or float16/32) tensor, got {getattr(x, 'dtype', type(x).__name__)}"
                    )
                if x.dim() != 2 or x.size(0) != rows:
                    raise DeepEPInputError(
                        f"combine x must be [{rows}, hidden] ({'expanded' if handle.do_expand else 'received'} rows of "
                        f"the handle's dispatch), got {list(x.shape)}"
                    )
                self._check_on_device(x, "x")
                K = state.owner_rank.size(1)
                wshape = (rows,) if handle.do_expand else (rows, K)
                if handle.do_expand and isinstance(topk_weights, torch.Tensor) and topk_weights.dim() == 2:
                    topk_weights = topk_weights.reshape(-1) if topk_weights.size(1) == 1 else topk_weights
                weights = self._check_weights(topk_weights, wshape, "topk_weights")
                if bias is not None:
                    biases = list(bias) if isinstance(bias, (tuple, list)) else [bias]
                    if len(biases) > 2:
                        raise DeepEPInputError(f"bias takes at most 2 tensors, got {len(biases)}")
                    for b in biases:
                        if not isinstance(b, torch.Tensor) or tuple(b.shape) != (state.num_tokens, x.size(1)):
                            raise DeepEPInputError(
                                f"each bias must be a tensor [{state.num_tokens}, {x.size(1)}], got "
                                f"{list(getattr(b, 'shape', [])) or type(b).__name__}"
                            )
                        if not b.dtype.is_floating_point or b.element_size() == 1:
                            raise DeepEPTypeError(f"bias must be floating point, got {b.dtype}")
                        self._check_on_device(b, "bias")
                cfg = self._config(num_sms if num_sms > 0 else handle.num_sms)
            except (DeepEPError, ValueError, TypeError) as exc:
                self._fail_everywhere("combine", exc, cached=True)

            valid = state.owner_rank >= 0
            pairs = handle.do_expand and not self.allow_multiple_reduction
            if not handle.do_expand:
                send, send_w, back = x, weights, state.backward_rows
            elif not pairs:
                send = red.local_reduce(x, state.slot)
                send_w = None
                if weights is not None:
                    send_w = lay.gather_rows(weights.reshape(-1, 1), state.slot.reshape(-1)).view(-1, K)
                back = state.backward_rows
            else:
                send, back = x, state.backward_pairs
                send_w = weights.reshape(-1, 1) if weights is not None else None
            home = self._v1("combine", buf.dispatch, send, handle=back, config=cfg, compress=False)[0]
            home_w = None
            if send_w is not None:
                home_w = self._v1("combine", buf.dispatch, send_w, handle=back, config=cfg, compress=False)[0]
            scope.wait_before_epilogue(previous_event_before_epilogue)
            if pairs:
                positions = state.home_pairs
                combined = red.reduce_home_pairs(home, positions, valid, biases, x.dtype)
            else:
                positions = state.home_rows.gather(1, state.owner_rank.clamp(min=0))
                hybrid = self.num_scaleout_ranks > 1 and self.allow_multiple_reduction
                combined = red.reduce_home_rows(
                    home, state.home_rows, state.owner_rank, biases, self.num_scaleup_ranks if hybrid else None, x.dtype
                )
            combined_w = red.select_weights(home_w, positions, valid) if home_w is not None else None
        event = scope.finish([combined, combined_w])
        return combined, combined_w, event

    def __repr__(self) -> str:
        return (
            f"ElasticBuffer(rank {self.rank_idx}/{self.num_ranks}, backend={self.backend!r}, "
            f"logical={self.num_scaleout_ranks}x{self.num_scaleup_ranks})"
        )
