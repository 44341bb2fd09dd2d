"""Differentiable dispatch and combine (docs/api.md, deep_ep.ops).

``dispatch``'s gradient is a ``combine`` of the gradients with the same
handle; ``combine``'s gradient is a cached ``dispatch``. Gradients travel
in 16 bits whatever the Buffer's ``compression_level`` (the forward's
quantisation is treated as the identity: a straight-through gradient);
``grad_compression=8`` sends them in 8 bits. Every rank runs the same collectives in backward whatever
gradients happen to be ``None`` locally (missing ones are zeros), so ranks
never wait on each other.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from .buffer import Buffer, DispatchHandle
from .config import Config

__all__ = ["dispatch", "combine"]


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, buffer: Buffer, kwargs: dict, x: torch.Tensor, topk_weights: Optional[torch.Tensor], grad_level=False
    ):
        events = kwargs.pop("_events", None)  # (internal) where an async call leaves its event
        recv_x, recv_idx, recv_w, counts, handle, event = buffer.dispatch(x, topk_weights=topk_weights, **kwargs)
        if events is not None:
            events.append(event)
        ctx.buffer, ctx.handle, ctx.grad_level = buffer, handle, grad_level
        ctx.has_w = topk_weights is not None
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(recv_idx if recv_idx is not None else torch.empty(0, device="cpu"))
        if recv_idx is not None:
            ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_idx, recv_w, counts, handle

    @staticmethod
    def backward(ctx, grad_x, _grad_idx, grad_w, _gc=None, _gh=None):
        buffer, handle = ctx.buffer, ctx.handle
        plan = handle.plan
        (recv_idx,) = ctx.saved_tensors
        rows = plan.num_out_rows
        if grad_x is None:
            grad_x = torch.zeros((rows, 1), dtype=ctx.x_dtype, device=buffer.device)
        w = None
        if ctx.has_w:
            if grad_w is None:
                grad_w = torch.zeros((rows, recv_idx.size(1)), dtype=torch.float32, device=buffer.device)
            # Entries that are not this rank's experts were constants (0) in forward.
            w = torch.where(recv_idx >= 0, grad_w.float(), 0.0)
        gx, gw, _ = buffer.combine(grad_x.contiguous(), handle, topk_weights=w, compress=ctx.grad_level)
        return None, None, gx.to(ctx.x_dtype), gw, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        buffer: Buffer,
        handle: DispatchHandle,
        x: torch.Tensor,
        topk_weights: Optional[torch.Tensor],
        num_bias: int,
        b0: Optional[torch.Tensor],
        b1: Optional[torch.Tensor],
        grad_level=False,
        opts: Optional[dict] = None,
    ):
        bias = tuple(b for b in (b0, b1)[:num_bias])
        opts = dict(opts or {})
        events = opts.pop("_events", None)  # (internal) previous_event / async_finish, and the event back
        out, out_w, event = buffer.combine(x, handle, topk_weights=topk_weights, bias=bias if bias else None, **opts)
        if events is not None:
            events.append(event)
        ctx.buffer, ctx.handle, ctx.grad_level = buffer, handle, grad_level
        ctx.x_rows, ctx.x_dtype = x.size(0), x.dtype
        ctx.has_w = topk_weights is not None
        ctx.bias_dtypes = [b.dtype for b in bias]
        ctx.out_width = out.size(1)
        ctx.w_width = topk_weights.size(1) if topk_weights is not None else 0
        return out, out_w

    @staticmethod
    def backward(ctx, grad_out, grad_w):
        buffer, handle = ctx.buffer, ctx.handle
        plan = handle.plan
        if grad_out is None:
            grad_out = torch.zeros((plan.num_tokens, ctx.out_width), dtype=ctx.x_dtype, device=buffer.device)
        gx = buffer.dispatch(grad_out.to(ctx.x_dtype).contiguous(), handle=handle, compress=ctx.grad_level)[0]
        gx = _fit_rows(gx, ctx.x_rows)
        gw = None
        if ctx.has_w:
            if grad_w is None:
                grad_w = torch.zeros((plan.num_tokens, ctx.w_width), dtype=torch.float32, device=buffer.device)
            gw = _fit_rows(buffer.dispatch(grad_w.float().contiguous(), handle=handle, compress=False)[0], ctx.x_rows)
        gb = [grad_out.to(d) for d in ctx.bias_dtypes] + [None] * (2 - len(ctx.bias_dtypes))
        return None, None, gx, gw, None, gb[0], gb[1], None, None


def _fit_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Trim or zero-pad a received tensor to ``rows`` rows (real rows vs ``num_worst_tokens`` rows)."""
    if t.size(0) == rows:
        return t
    if t.size(0) > rows:
        return t[:rows]
    pad = torch.zeros((rows - t.size(0),) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    return torch.cat([t, pad])


def dispatch(
    buffer: Buffer,
    x: torch.Tensor,
    topk_idx: Optional[torch.Tensor] = None,
    topk_weights: Optional[torch.Tensor] = None,
    *,
    num_experts: Optional[int] = None,
    is_token_in_rank: Optional[torch.Tensor] = None,
    expert_alignment: int = 1,
    num_worst_tokens: int = 0,
    config: Optional[Config] = None,
    grad_compression: Union[bool, int] = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], List[int], DispatchHandle]:
    """Differentiable :meth:`Buffer.dispatch` of a floating-point ``x`` (and ``topk_weights``).

    Give ``topk_idx`` with ``num_experts`` (the layout is computed here), or
    ``is_token_in_rank`` alone. Returns ``(recv_x, recv_topk_idx,
    recv_topk_weights, num_recv_tokens_per_expert_list, handle)``. Backward:
    the gradient of ``x`` is the combine of ``recv_x``'s gradient; the
    gradient of ``topk_weights[t, k]`` is the gradient of the received weight
    on the rank that holds expert ``k``. ``x`` travels in the Buffer's
    ``compression_level``; its gradient in 16 bits, or 8 with
    ``grad_compression=8``.
    """
    kwargs = dict(expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens, config=config)
    if topk_idx is not None:
        if num_experts is None:
            raise ValueError("deep_ep.ops.dispatch with topk_idx needs num_experts")
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
        kwargs.update(
            num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=topk_idx
        )
    else:
        kwargs.update(is_token_in_rank=is_token_in_rank)
    return _Dispatch.apply(buffer, kwargs, x, topk_weights, _grad_level(grad_compression))


def combine(
    buffer: Buffer,
    x: torch.Tensor,
    handle: DispatchHandle,
    topk_weights: Optional[torch.Tensor] = None,
    bias: Union[torch.Tensor, Sequence[torch.Tensor], None] = None,
    config: Optional[Config] = None,
    grad_compression: Union[bool, int] = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Differentiable :meth:`Buffer.combine`; returns ``(combined_x, combined_topk_weights)``.

    Backward: the gradient of ``x`` (and of ``topk_weights``) is a cached
    dispatch of the output gradient with the same handle; each bias gets the
    output gradient. The gradient of ``x`` travels in 16 bits, or 8 with
    ``grad_compression=8``.
    """
    if bias is None:
        bias_list: List[torch.Tensor] = []
    elif isinstance(bias, torch.Tensor):
        bias_list = [bias]
    else:
        bias_list = list(bias)
    if len(bias_list) > 2:
        raise ValueError(f"bias takes at most 2 tensors, got {len(bias_list)}")
    b = bias_list + [None] * (2 - len(bias_list))
    return _Combine.apply(buffer, handle, x, topk_weights, len(bias_list), b[0], b[1], _grad_level(grad_compression))


def _grad_level(grad_compression: Union[bool, int]):
    """The ``compress`` argument of the backward calls: ``False`` (16 bits) or 8."""
    if grad_compression in (False, None, 16):
        return False
    if grad_compression in (True, 8):
        return 8
    raise ValueError(f"grad_compression must be False (16 bits) or 8, got {grad_compression!r}")
