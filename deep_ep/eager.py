"""The eager lanes of :class:`deep_ep.Buffer`: what a call whose arguments' *signature* was seen before skips.

Training calls ``get_dispatch_layout`` and ``dispatch`` with the same shapes every layer and step. A call with
DeepEP's default options is validated the first time a Buffer sees its signature (each tensor's shape,
dtype and device, each other argument's type and value: :func:`deep_ep.calls.tensor_signature`); later calls
of that signature reuse what the first one computed, as a compiled kernel is reused:

- ``get_dispatch_layout``: the layout kernel prepared for the shape (:func:`deep_ep.kernels.layout.prepare`);
- ``dispatch`` (fresh): the parsed request (:class:`deep_ep.calls.ParseCache`, its header and row widths),
  and, where the call takes the fused nvlink path, the notify's statics: the **fused lane**
  (:meth:`EagerLanes._fused_fresh`) then runs notify -> plan -> data kernel -> handle without the general
  path's steps (``tests/test_fused.py`` compares the two).

Value checks (ids in range, ranks agreeing, received counts) run on every call. Non-contiguous tensors,
tensor subclasses and fp8 pairs never take a lane.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from . import kernels
from .caches import keep
from .calls import CallOptions, DispatchRequest, ParseCache, tensor_signature
from .plans import fused_plan, row_widths
from .streams import StreamCall
from .wire import record_dispatch

__all__ = ["EagerLanes"]

#: DeepEP's default call options (no event, no async): the lanes' (a request's SM count is its own)
DEFAULT_OPTIONS = CallOptions(0)


class EagerLanes:
    """Mixin of :class:`deep_ep.Buffer` (see the module docstring); it uses the Buffer's device, streams,
    transport, waiter and wire."""

    def _init_lanes(self) -> None:
        """The lanes' state (called once by the Buffer, after its device and streams)."""
        #: on CPU (no streams) the lanes share one call with the default options
        self._plain_call = None if self._cuda else StreamCall(self.device, None, DEFAULT_OPTIONS)
        self._layouts: Dict[Any, Any] = {}  # topk_idx signature -> the prepared layout kernel
        self._parsed = ParseCache()  # fresh dispatches' parsed requests by signature

    # ------------------------------------------------------------------ get_dispatch_layout
    def _eager_layout(self, topk_idx: Any, num_experts: Any) -> Tuple[Any, Optional[Tuple]]:
        """``(key, result)``: the call's signature and, when it was validated before, the layout (else
        ``None``: the caller validates, then :meth:`_keep_layout`)."""
        key = (tensor_signature(topk_idx), type(num_experts), num_experts)
        run = self._layouts.get(key)
        if run is not None and kernels.available(topk_idx):  # (the kernel switch is read per call)
            return key, self._layout_call(topk_idx, num_experts, run, None)
        return key, None

    def _keep_layout(self, key: Any, topk_idx: torch.Tensor, num_experts: int):
        """The layout kernel prepared for validated ``topk_idx`` (kept for ``key`` when it is cacheable)."""
        from .kernels.layout import prepare
        from .layout import node_split

        nodes, rpn = node_split(self.num_ranks, self._transport.ranks_per_node)
        T, K = topk_idx.shape
        lane = prepare(T, K, num_experts, self.num_ranks, nodes, rpn, self._transport.fused_plans, self.device)
        if key is not None and key[0] is not False:
            keep(self._layouts, key, lane)
        return lane

    # ------------------------------------------------------------------ dispatch
    def _eager_dispatch(self, x, per_rank, in_rank, per_expert, idx, w, alignment, worst) -> Tuple[Any, Any]:
        """``(key, result)`` of a fresh dispatch with the default options: its signature and, when it was
        parsed before, the call's outputs (else ``None``: the caller parses, then :meth:`_keep_parsed`)."""
        key = (
            tensor_signature(x),
            tensor_signature(per_rank),
            tensor_signature(in_rank),
            tensor_signature(per_expert),
            tensor_signature(idx),
            tensor_signature(w),
            type(alignment),
            alignment,
            type(worst),
            worst,
            self.num_sms,  # (Buffer.set_num_sms changes the parsed options)
        )
        parsed = self._parsed.get(key)
        if parsed is None:
            return key, None
        if parsed.lane is not None and not (self._cuda and torch.cuda.is_current_stream_capturing()):
            return key, self._fused_fresh(parsed, x, in_rank, per_expert, idx, w)
        req = parsed.clone()
        req.x, req.is_token_in_rank, req.num_tokens_per_expert = x, in_rank, per_expert
        req.topk_idx, req.topk_weights = idx, w
        return key, self._run_dispatch(req)

    def _keep_parsed(self, key: Any, req: DispatchRequest) -> None:
        """Keep a parsed fresh dispatch for ``key`` (with its header, row widths and, where it takes the fused
        path, the notify's statics), without its tensors."""
        if req.tolerance is not None or req.problem is not None or not ParseCache.cacheable(key):
            return
        kept = req.clone()  # (the call fills in some of req's fields)
        kept.header_base, kept.widths = kept.header(0, 0), tuple(row_widths(kept))
        t = self._transport
        if (
            kept.codec is None
            and kept.scales is None
            and kept.topk_idx is not None
            and kept.is_token_in_rank is not None
            and t.fused_takes_dispatch(kept.num_experts)
        ):
            kept.lane = t.fused_notify_statics(kept.num_tokens, kept.num_experts, kept.num_topk, True, kept.widths)
        # (every call of the signature brings its own tensors: the first call's must not stay alive here)
        kept.x = kept.scales = kept.topk_idx = kept.topk_weights = None
        kept.is_token_in_rank = kept.num_tokens_per_expert = None
        self._parsed.put(key, kept)

    def _fused_waits(self, num_worst_tokens: int) -> bool:
        """Whether a fused fresh dispatch reads its notify's block now: always, but a ``num_worst_tokens`` one
        (unless every call is checked: ``DEEP_EP_CHECK``), whose verdict is read at the next call."""
        return not (num_worst_tokens > 0 and not self._check_every_call)

    def _fused_fresh(self, req: DispatchRequest, x, mask, pe, idx, w):
        """A fresh dispatch on the fused path whose argument signature was parsed before (``req``, with its
        ``lane``): :meth:`_run_dispatch` -> :func:`build_fused_plan` -> :meth:`_finish_dispatch`'s steps for
        that case, what the signature fixes computed once (tests compare the two)."""
        self._waiter.seq += 1
        seq = self._waiter.seq
        t = self._transport
        worst = req.num_worst_tokens
        wait = self._fused_waits(worst)
        call = self._plain_call or StreamCall(self.device, self._comm_stream, req.options, self._events)
        with call:
            fl, out, _ = t.fused_notify_run(req.lane, req.header(seq, self._uid), mask, idx, pe, wait, False, seq)
            plan, expert_list = fused_plan(t, fl, out, mask, None, req.num_experts, worst, req.expert_alignment, True)
            if plan.fused is None:  # rows that do not fit an area: the host path moves them (every rank alike)
                full = req.clone()
                full.x, full.is_token_in_rank, full.num_tokens_per_expert = x, mask, pe
                full.topk_idx, full.topk_weights = idx, w
                return self._finish_dispatch(call, plan, full, fl.L, expert_list)
            recv = t.fused_dispatch(
                plan, [x, idx] if w is None else [x, idx, w], call.alloc, True, False, req.options.num_sms
            )
        if self._wire.stats:
            record_dispatch(self._wire, None, x, plan, self.rank)
        handle = self._new_handle(plan, worst)
        event = call.finish((), comm_made=[])  # (outputs on the compute stream, default options: no async)
        return (
            recv[0],
            recv[1],
            recv[2] if w is not None else None,
            expert_list if expert_list is not None else [],
            handle,
            event,
        )
