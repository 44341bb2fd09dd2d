"""DeepEP's low-latency mode (docs/api.md, low-latency mode) on top of any transport: fixed shapes, no host sync on nvlink.

On the nvlink transport with Triton (hidden a multiple of 8) each call is
one send kernel, one device barrier and one receive kernel
(:mod:`deep_ep.transport.nvlink.low_latency`): fp8 cast fused into the send, rows
stored straight into the receivers' symmetric memory (once per destination
rank, not once per expert), no host sync (CUDA graphs), and
``return_recv_hook=True`` splits the call as DeepEP does (the call sends,
the hook receives). Its combine sums on the experts' side first (weights
stored into every rank, a barrier, one bf16 row per (token, rank) home, a
barrier, the source adds them): the result differs from the float32 sum of
the expert rows by at most one bf16 rounding of each rank's partial sum.

Elsewhere (collective, hierarchical, CPU, ``DEEP_EP_DISABLE_TRITON=1``,
``DEEP_EP_CHECK=1``) the same outputs come from the normal path: one
message per (token, selected expert): each token's row is encoded once
(fp8 with DeepEP's per-128 scales, or bf16), repeated for its ``K`` experts
and dispatched as ``T * K`` one-expert "pairs" with ``num_worst_tokens =
R * M * min(K, L)`` (the most a rank can receive); the receiver scatters
its rows into ``[L, R * M, H]``. Combine gathers the rows back into pair
order, returns each pair to its source with the dispatch's handle, and the
source sums ``topk_weights[t, k] * row(t, k)`` in float32. There the hook
does nothing (the call already received).

Both paths: expert ``l``'s rows first, in source-rank then token order,
``recv_count[l]`` of them (the other rows are uninitialised).

Every rank must pass the same ``num_max_dispatch_tokens_per_rank``,
``num_experts``, top-k and fp8 settings, and distinct experts per token. An
argument error of a dispatch is raised on the rank that made it and, on the
normal path, through the metadata exchange as ``RemoteInputError`` on the
others; on the nvlink paths the others cannot learn it without a host sync
and wait out ``timeout_s``, as a DeepEP kernel would assert. On the kernel
path an invalid expert id (out of range, or repeated in a token) is skipped
and the rank's next low-latency call raises.

Differences from DeepEP's kernels, documented: the order of a source's block
inside an expert's rows is fixed (source rank ascending) where DeepEP's is
the arrival order; every call returns new tensors, so results stay valid
after later calls (the staging is what alternates: at most two calls with
pending hooks, as DeepEP); ``dispatch_wait_recv_cost_stats`` and
``combine_wait_recv_cost_stats`` are accepted and left unchanged;
``use_logfmt`` raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Tuple

import torch

from . import layout, validate
from .agreement import Problem, settings_code
from .calls import CallOptions, CombineRequest, DispatchRequest
from .compress import make_codec
from .config import EventOverlap
from .errors import DeepEPInputError, DeepEPTypeError

__all__ = ["LowLatencyHandle", "LowLatency", "low_latency_dispatch", "low_latency_combine", "rdma_size_hint"]


@dataclass
class LowLatencyHandle:
    """What a low-latency combine needs from its dispatch (opaque to callers)."""

    inner: Any  # the pair dispatch's DispatchHandle
    slot: torch.Tensor  # int64 [N]: row of each received pair in [L * R * M] (-1: none)
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    num_tokens: int
    topk: int
    combine_buffer: Optional[torch.Tensor] = field(default=None, repr=False)
    fast: Optional[dict] = field(default=None, repr=False)  # the nvlink kernel path's state (else None)


def _noop() -> None:
    """The receive hook: the call already received."""


def rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """Staging bytes low-latency calls may need: the nvlink kernel path's two areas for bf16 rows (the
    widest; fp8 needs less), which also bound the pair rows of the other paths."""
    from .transport.nvlink.low_latency import area_layout

    R = max(num_ranks, 1)
    E = max(num_experts // R, 1) * R
    return 2 * area_layout(R, E, num_max_dispatch_tokens_per_rank, 1, hidden, False, False)["bytes"] + (1 << 20)


def _check(buf, x: torch.Tensor, topk_idx: torch.Tensor, M: int, E: int) -> Tuple[int, int, int]:
    R = buf.num_ranks
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype != torch.bfloat16:
        raise DeepEPTypeError(
            f"low_latency_dispatch x must be bfloat16 [num_tokens, hidden], got "
            f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}"
        )
    if not isinstance(M, int) or M < 1:
        raise DeepEPInputError(f"num_max_dispatch_tokens_per_rank must be a positive int, got {M!r}")
    T, H = x.shape
    if T > M:
        raise DeepEPInputError(f"low_latency_dispatch got {T} tokens, more than num_max_dispatch_tokens_per_rank={M}")
    if not isinstance(E, int) or E < 1 or E % R:
        raise DeepEPInputError(f"num_experts={E!r} must be a positive multiple of the number of ranks {R}")
    if (
        not isinstance(topk_idx, torch.Tensor)
        or topk_idx.dim() != 2
        or topk_idx.size(0) != T
        or topk_idx.dtype not in (torch.int64, torch.int32)
    ):
        raise DeepEPInputError(
            f"topk_idx must be an int64 (or int32) tensor [{T}, num_topk], got "
            f"{getattr(topk_idx, 'dtype', type(topk_idx).__name__)} "
            f"{list(getattr(topk_idx, 'shape', []))}"
        )
    try:
        validate.check_device(x, buf.device, "x", code=8)
        validate.check_device(topk_idx, buf.device, "topk_idx", code=8)
    except Problem as p:
        raise p.exc from None
    return T, H, topk_idx.size(1)


def _check_distinct(topk_idx: torch.Tensor) -> None:
    """A token names each expert at most once (else an expert could receive more than ``R * M`` rows):
    raised on the host for CPU tensors, a device assertion (no sync) on CUDA."""
    if topk_idx.size(1) < 2 or topk_idx.size(0) == 0:
        return
    srt = topk_idx.sort(dim=1).values
    dup = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()
    if topk_idx.is_cuda:
        torch._assert_async(~dup, "low_latency_dispatch: a token names the same expert twice")
    elif bool(dup):
        raise DeepEPInputError(
            "low_latency_dispatch: a token names the same expert twice; the experts of a "
            "token must be distinct (-1 may repeat)"
        )


def low_latency_dispatch(
    buf,
    engine,
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
    """See :meth:`deep_ep.Buffer.low_latency_dispatch` and the module docstring."""
    M, E, R = num_max_dispatch_tokens_per_rank, num_experts, buf.num_ranks
    problem = None
    T = H = K = -1
    try:
        T, H, K = _check(buf, x, topk_idx, M, E)
        if async_finish and return_recv_hook:
            raise DeepEPInputError("async_finish and return_recv_hook are exclusive")
        if use_ue8m0 and not use_fp8:
            raise DeepEPInputError("use_ue8m0 needs use_fp8=True")
        if use_fp8 and H % (512 if use_ue8m0 else 128):
            raise DeepEPInputError(
                f"fp8 low-latency dispatch needs hidden divisible by {512 if use_ue8m0 else 128} "
                f"(one scale per 128 values{', four per int32' if use_ue8m0 else ''}), got {H}"
            )
        topk_idx = topk_idx.to(torch.int64)
        if not topk_idx.is_cuda:
            layout.check_topk_idx(topk_idx, E)
            _check_distinct(topk_idx)
    except (DeepEPInputError, DeepEPTypeError) as exc:
        problem = Problem(8, exc)
    # the settings every rank must share (agreed in the pair dispatch's metadata exchange)
    aux = settings_code("dispatch", M, H, E, K, bool(use_fp8), bool(round_scale), bool(use_ue8m0))
    fast = engine if engine is not None and H % 8 == 0 and problem is None else None
    if engine is not None and problem is not None:
        problem.raise_on(buf.rank)  # the kernel path cannot tell the others without a host sync (documented)
    if fast is not None:  # invalid ids are skipped and flagged by the kernel (no host sync)
        recv_x, recv_count, state, hk = fast.dispatch(
            x, topk_idx, M, E, use_fp8, round_scale, use_ue8m0, cumulative_local_expert_recv_stats, return_recv_hook
        )
        handle = LowLatencyHandle(None, None, M, H, E, T, K, fast=state)
        return recv_x, recv_count, handle, _event(async_finish, x), hk
    if problem is not None:  # every rank learns it in the pair dispatch's agreement (this rank raises its own)
        buf._run_dispatch(DispatchRequest(problem=problem, aux=aux, options=CallOptions(buf.num_sms)))
    L = E // R
    if topk_idx.is_cuda:
        _check_distinct(topk_idx)  # (a device assertion: nothing waits for the host)
    codec = make_codec(8, H, round_scale=round_scale, use_ue8m0=use_ue8m0) if use_fp8 else None
    rows = codec.encode(x) if codec is not None else x.contiguous().view(torch.uint8)  # once per token
    pair_rows = rows.repeat_interleave(K, dim=0) if K != 1 else rows
    pair_idx = topk_idx.to(torch.int64).reshape(T * K, 1)
    worst = R * M * min(K, L)
    _, _, per_expert, in_rank, _ = buf.get_dispatch_layout(pair_idx, E)
    # the encoded rows travel as opaque 16-bit words (their byte width is even: H is a multiple of 128)
    req = DispatchRequest.parse(
        x=pair_rows.view(torch.bfloat16),
        num_tokens_per_rank=None,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=pair_idx,
        topk_weights=None,
        expert_alignment=1,
        num_worst_tokens=worst,
        compress=False,
        return_compressed=False,
        options=CallOptions(buf.num_sms),
        problem=None,
        wire=buf._wire,
        num_ranks=R,
        device=buf.device,
        device_plans=buf.device_plans,
    )
    req.aux = aux
    recv, recv_idx, _, _, inner, _ = buf._run_dispatch(req)
    recv = recv.view(torch.uint8)
    local = recv_idx[:, 0]  # local expert, -1 for padding
    onehot = local.unsqueeze(1) == torch.arange(L, device=local.device)  # [N, L]; padding (-1) matches none
    pos = layout.token_cumsum(onehot, torch.int64).gather(1, local.clamp(min=0).unsqueeze(1))[:, 0] - 1
    dump = L * R * M
    slot = torch.where(local >= 0, local * (R * M) + pos, torch.full_like(pos, -1))
    where = torch.where(slot >= 0, slot, dump)
    # Only the received rows are written (the layout has L * R * M rows; the others are uninitialised:
    # only the first recv_count[l] rows of expert l are valid); padding goes to one spare last row.
    if codec is None:
        flat = torch.empty((dump + 1, H), dtype=torch.bfloat16, device=x.device)
        flat.index_copy_(0, where, recv.view(torch.bfloat16))
        recv_x: Any = flat[:dump].view(L, R * M, H)
    else:
        sb = codec.scale_bytes
        vals = torch.empty((dump + 1, H), dtype=torch.uint8, device=x.device)
        heads = torch.empty((dump + 1, sb), dtype=torch.uint8, device=x.device)
        vals.index_copy_(0, where, recv[:, sb:])
        heads.index_copy_(0, where, recv[:, :sb])
        scales = heads[:dump].view(torch.int32 if use_ue8m0 else torch.float32)
        recv_x = (vals[:dump].view(torch.float8_e4m3fn).view(L, R * M, H), scales.view(L, R * M, -1))
    recv_count = onehot.sum(dim=0, dtype=torch.int32)
    if cumulative_local_expert_recv_stats is not None:
        cumulative_local_expert_recv_stats.add_(recv_count.to(cumulative_local_expert_recv_stats.dtype))
    handle = LowLatencyHandle(inner, slot, M, H, E, T, K)
    return recv_x, recv_count, handle, _event(async_finish, x), (_noop if return_recv_hook else None)


def low_latency_combine(
    buf,
    engine,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    handle: LowLatencyHandle,
    use_logfmt: bool = False,
    zero_copy: bool = False,
    async_finish: bool = False,
    return_recv_hook: bool = False,
    out: Optional[torch.Tensor] = None,
    combine_wait_recv_cost_stats: Optional[torch.Tensor] = None,
):
    """See :meth:`deep_ep.Buffer.low_latency_combine` and the module docstring."""
    problem = None
    aux = 0
    try:
        if not isinstance(handle, LowLatencyHandle):
            raise DeepEPTypeError(f"handle must be the one low_latency_dispatch returned, got {type(handle).__name__}")
        if use_logfmt:
            raise DeepEPInputError(
                "use_logfmt is not implemented by deep_ep (combine sends bf16 rows); pass use_logfmt=False"
            )
        if async_finish and return_recv_hook:
            raise DeepEPInputError("async_finish and return_recv_hook are exclusive")
        R, M, H, T, K = (
            buf.num_ranks,
            handle.num_max_dispatch_tokens_per_rank,
            handle.hidden,
            handle.num_tokens,
            handle.topk,
        )
        L = handle.num_experts // R
        aux = settings_code("combine", M, H, handle.num_experts, K)
        if zero_copy:
            if handle.combine_buffer is None:
                raise DeepEPInputError(
                    "zero_copy=True needs the buffer from get_next_low_latency_combine_buffer(handle), "
                    "filled with the expert outputs"
                )
            x = handle.combine_buffer
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (L, R * M, H) or x.dtype != torch.bfloat16:
            raise DeepEPInputError(
                f"low_latency_combine x must be bfloat16 [{L}, {R * M}, {H}], got "
                f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}"
            )
        for name, t in (("topk_idx", topk_idx), ("topk_weights", topk_weights)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (T, K):
                raise DeepEPInputError(
                    f"{name} must be a tensor [{T}, {K}] (as dispatched), got "
                    f"{list(getattr(t, 'shape', [])) or type(t).__name__}"
                )
        if out is not None and (
            not isinstance(out, torch.Tensor) or tuple(out.shape) != (T, H) or out.dtype != torch.bfloat16
        ):
            raise DeepEPInputError(
                f"out must be bfloat16 [{T}, {H}], got {getattr(out, 'dtype', type(out).__name__)} "
                f"{list(getattr(out, 'shape', []))}"
            )
        if handle.fast is not None and handle.fast.get("received") is False:
            raise DeepEPInputError(
                "low_latency_combine of a dispatch whose receive hook has not run: call the hook first (the "
                "dispatch's rows have not arrived yet)"
            )
    except (DeepEPInputError, DeepEPTypeError) as exc:
        problem = Problem(8, exc)
    on_kernels = isinstance(handle, LowLatencyHandle) and handle.fast is not None
    if problem is not None and (on_kernels or engine is not None):
        problem.raise_on(buf.rank)  # the kernel path cannot tell the others without a host sync (documented)
    if problem is not None:  # every rank learns it in the pair combine's agreement (this rank raises its own)
        buf._run_combine(CombineRequest(problem=problem, aux=aux, options=CallOptions(buf.num_sms)))
    if handle.fast is not None:
        fast = engine if engine is not None and H % 8 == 0 else None
        if fast is None:
            raise DeepEPInputError("this handle comes from the nvlink kernel path of another Buffer")
        res = out if out is not None else torch.empty((T, H), dtype=torch.bfloat16, device=x.device)
        hk = fast.combine(x, topk_idx, topk_weights, handle.fast, res, return_recv_hook)
        return res, _event(async_finish, x), hk
    rows = x.reshape(L * R * M, H).index_select(0, handle.slot.clamp(min=0))  # back into pair order
    req = buf._parse_combine(rows, handle.inner, None, None, False, CallOptions(buf.num_sms), None)
    req.aux = aux
    pairs, _, _ = buf._run_combine(req)
    w = torch.where(topk_idx >= 0, topk_weights.float(), 0.0)
    y = pairs.view(T, K, H).float()
    y = torch.where((topk_idx >= 0).unsqueeze(2), y, 0.0)
    res = torch.einsum("tk,tkh->th", w, y) if K else torch.zeros((T, H), device=x.device)
    if out is not None:
        out.copy_(res)
        res = out
    else:
        res = res.to(torch.bfloat16)
    return res, _event(async_finish, x), (_noop if return_recv_hook else None)


def next_combine_buffer(handle: LowLatencyHandle, num_ranks: int, device: torch.device) -> torch.Tensor:
    """The ``[L, R * M, H]`` bf16 buffer a ``zero_copy`` combine of ``handle`` reads (made once per handle)."""
    if handle.combine_buffer is None:
        L = handle.num_experts // num_ranks
        handle.combine_buffer = torch.zeros(
            (L, num_ranks * handle.num_max_dispatch_tokens_per_rank, handle.hidden), dtype=torch.bfloat16, device=device
        )
    return handle.combine_buffer


def _event(async_finish: bool, t: torch.Tensor) -> EventOverlap:
    """The returned event: recorded after all of the call's work on the current stream (async), else none."""
    if async_finish and t.is_cuda:
        ev = torch.cuda.Event()
        ev.record()
        return EventOverlap(ev)
    return EventOverlap(None)


class LowLatency:
    """The low-latency mode of one :class:`deep_ep.Buffer` (docs/api.md, low-latency mode), a component the Buffer owns.

    It uses the Buffer's public methods (the pair dispatch of the normal path) and, where the
    Buffer's transport has one, the transport's low-latency kernel engine (``engine()``: made on the
    first call, ``None`` where the kernels do not apply: other transports, no Triton on the device,
    ``DEEP_EP_CHECK``).
    """

    def __init__(self, buffer: Any, engine: Callable[[], Any]) -> None:
        """Args:
        buffer: the owning :class:`deep_ep.Buffer`.
        engine: makes the transport's low-latency engine (or returns ``None``); called once, lazily.
        """
        self.buffer = buffer
        self._make_engine = engine
        self._engine: Any = None
        self._made = False

    @property
    def engine(self) -> Any:
        """The kernel engine (``None``: the pair-dispatch path)."""
        if not self._made:
            self._engine, self._made = self._make_engine(), True
        return self._engine if self._engine is None or getattr(self._engine, "usable", True) else None

    def dispatch(self, *args: Any) -> Any:
        """See :meth:`deep_ep.Buffer.low_latency_dispatch` (same arguments, positional)."""
        return low_latency_dispatch(self.buffer, self.engine, *args)

    def combine(self, *args: Any) -> Any:
        """See :meth:`deep_ep.Buffer.low_latency_combine` (same arguments, positional)."""
        return low_latency_combine(self.buffer, self.engine, *args)

    def next_combine_buffer(self, handle: Any) -> torch.Tensor:
        """See :meth:`deep_ep.Buffer.get_next_low_latency_combine_buffer`."""
        if not isinstance(handle, LowLatencyHandle):
            raise DeepEPTypeError(f"handle must be the one low_latency_dispatch returned, got {type(handle).__name__}")
        return next_combine_buffer(handle, self.buffer.num_ranks, self.buffer.device)

    def clean(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """See :meth:`deep_ep.Buffer.clean_low_latency_buffer` (checks its arguments)."""
        args = (num_max_dispatch_tokens_per_rank, hidden, num_experts)
        if not all(isinstance(a, int) and a >= 1 for a in args) or num_experts % self.buffer.num_ranks:
            raise DeepEPInputError(
                f"clean_low_latency_buffer: num_experts={num_experts!r} must be a positive "
                f"multiple of {self.buffer.num_ranks}, num_max_dispatch_tokens_per_rank="
                f"{num_max_dispatch_tokens_per_rank!r} and hidden={hidden!r} positive ints"
            )

    def destroy(self) -> None:
        """Release the engine's staging (if one was made)."""
        if self._engine is not None:
            self._engine.destroy()
