"""The chunked dispatch -> experts -> combine pipeline of :class:`~deep_ep.moe.ExpertParallelMoE` (forward
and backward; see that module's docstring)."""

from __future__ import annotations

from typing import List

import torch

from .. import layout
from ..config import EventOverlap


class _Pipeline(torch.autograd.Function):
    """The chunked dispatch -> experts -> combine of :class:`ExpertParallelMoE`, forward and backward.

    Forward: the dispatch of chunk ``c+1`` and the combine of chunk ``c`` are queued on the communication
    stream (``async_finish`` + events) around chunk ``c``'s experts on the compute stream. Backward: the
    gradient dispatch of chunk ``c+1`` runs while chunk ``c``'s expert backward computes, and the gradient
    combine of chunk ``c`` while chunk ``c+1``'s does. The experts' forward and backward are written out
    (:meth:`ExpertParallelMoE._experts_forward` / ``_experts_backward``): a chunk's backward computes only
    the gradients that travel (rows and routing weights); the experts' weight gradients are formed once at
    the end from every chunk's rows regrouped by expert (one grouped GEMM per weight, beside the last
    gradient combine), not as one full-size gradient per chunk summed. Every rank runs the same
    collectives in the same order, whatever gradients it needs.
    """

    @staticmethod
    def forward(ctx, layer, timer, chunks, first, x, w, w_gate_up, w_down):
        buf, n, cuda = layer.buffer, layer.num_chunks, x.is_cuda
        b, lays, idx = chunks
        need = any(ctx.needs_input_grad)
        sent: List[tuple] = []
        worst = 0
        if cuda and n > 1 and buf.device_plans:
            # nvlink: chunks dispatched with num_worst_tokens never wait for the host (one exchange of the
            # largest token count per forward instead of one metadata read per chunk; one chunk reads its
            # counts, which also lets a call larger than the staging run in rounds)
            with timer.span("comm"):
                t_max = int(buf.exchange_ints(torch.tensor([x.size(0)]), "MoE tokens").max())
            worst = layer.num_ranks * -(-t_max // n)

        def issue(c: int) -> None:
            per_rank, _, per_expert, in_rank = lays[c]
            lays[c] = None
            with timer.span("comm"):
                rx, ridx, rw, _, h, ev = buf.dispatch(
                    x[b[c] : b[c + 1]],
                    num_tokens_per_rank=per_rank,
                    is_token_in_rank=in_rank,
                    num_tokens_per_expert=per_expert,
                    topk_idx=idx[b[c] : b[c + 1]],
                    topk_weights=w[b[c] : b[c + 1]],
                    num_worst_tokens=worst,
                    async_finish=cuda,
                    previous_event=first if c == 0 else None,
                )
            pk = None
            if cuda:  # sort the chunk's pairs by expert on the comm stream, right after its dispatch
                compute = torch.cuda.current_stream()
                with torch.cuda.stream(buf.get_comm_stream()):
                    ev.current_stream_wait()
                    pk = layer._pack_start(ridx, consumer=compute)
            sent.append((rx, ridx, rw, h, ev, pk))

        issue(0)
        outs, pending, saved = [], [], []
        for c in range(n):
            if c + 1 < n:
                issue(c + 1)
            rx, ridx, rw, h, ev, pk = sent[c]
            sent[c] = None
            ev.current_stream_wait()
            with timer.span("compute"):
                y, st = layer._experts_forward(rx, ridx, rw, pk)
            with timer.span("comm"):
                out, _, ev2 = buf.combine(y, h, async_finish=cuda, previous_event=_record() if cuda else None)
            outs.append(out)
            pending.append(ev2)
            if need:
                saved.append((h, st, ridx))
        for ev in pending:
            ev.current_stream_wait()
        ctx.layer, ctx.saved, ctx.bounds, ctx.x_dtype, ctx.timer_type = layer, saved, b, x.dtype, type(timer)
        ctx.save_for_backward(w_gate_up, w_down)  # (autograd's version check: weights changed in place raise)
        return torch.cat(outs)

    @staticmethod
    def backward(ctx, grad_out):
        layer, saved, b = ctx.layer, ctx.saved, ctx.bounds
        _ = ctx.saved_tensors  # raises if the weights were modified in place since forward
        weight_grads = ctx.needs_input_grad[6] or ctx.needs_input_grad[7]
        buf, n, cuda = layer.buffer, len(saved), grad_out.is_cuda
        timer = ctx.timer_type(layer.record_stats, cuda, buf.get_comm_stream() if cuda else None)
        timer.start()
        got: List[tuple] = []

        def issue(c: int) -> None:
            with timer.span("compute"):
                g = grad_out[b[c] : b[c + 1]].to(ctx.x_dtype).contiguous()
            with timer.span("comm"):
                G, _, _, _, _, ev = buf.dispatch(g, handle=saved[c][0], async_finish=cuda, compress=False)
            got.append((G, ev))

        issue(0)
        gxs, gws, pending, parts = [], [], [], []
        for c in range(n):
            if c + 1 < n:
                issue(c + 1)
            G, ev = got[c]
            ev.current_stream_wait()
            h, st, ridx = saved[c]
            saved[c] = (h, None, None)  # the chunk's rows are freed once differentiated
            st["weight_grads"] = weight_grads
            with timer.span("compute"):
                gx, gw, part = layer._experts_backward(st, G[: st["N"]])
                if part is not None:
                    parts.append(part)
                gw = torch.where(ridx >= 0, gw.float(), 0.0)  # entries of other ranks' experts: constants
                gx = gx.contiguous()
                prev = _record() if cuda else None
            with timer.span("comm"):
                gxc, gwc, ev2 = buf.combine(
                    gx, h, topk_weights=gw, async_finish=cuda, previous_event=prev, compress=False
                )
            gxs.append(gxc)
            gws.append(gwc)
            pending.append(ev2)
        # the experts' weight gradients once for every chunk (while the last gradient combines run)
        with timer.span("compute"):
            g_gate_up, g_down = layer._expert_weight_grads(parts) if weight_grads else (None, None)
        for ev in pending:
            ev.current_stream_wait()
        with timer.span("compute"):
            gx_all, gw_all = torch.cat(gxs).to(ctx.x_dtype), torch.cat(gws)
        layer.backward_stats = timer.finish()
        return (None, None, None, None, gx_all, gw_all, g_gate_up, g_down)


def chunk_layouts(layer, idx: torch.Tensor, n: int) -> tuple:
    """``(bounds, layouts, idx)`` of ``n`` chunks of the routed tokens ``idx``: the chunk bounds and each
    chunk's dispatch layout. Computed on the compute stream *before* the event the first dispatch waits
    for (the dispatch reads them on the communication stream)."""
    b = [idx.size(0) * c // n for c in range(n + 1)]
    return b, [layout.dispatch_layout(idx[b[c] : b[c + 1]], layer.num_experts, layer.num_ranks) for c in range(n)], idx


def _record() -> EventOverlap:
    ev = torch.cuda.Event()
    ev.record()
    return EventOverlap(ev)
