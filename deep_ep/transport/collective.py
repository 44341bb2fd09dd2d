"""The ``collective`` transport: ``torch.distributed.all_to_all_single`` with split sizes.

Works on any process group whose backend implements all-to-all: NCCL on
GPUs (any topology, several nodes included) and gloo on CPU. Each dispatch
sends the token rows in one all-to-all straight into the output tensor
(row order = source rank, then token, which is exactly all-to-all order) and
the small per-row extras (top-k ids, weights, fp8 scales) packed as bytes in
a second one. Combine sends the rows back and reduces them with
:func:`~deep_ep.transport.base.reduce_rows`.

The split sizes must be known on the host, so every non-cached dispatch
synchronises with the host once, also with ``num_worst_tokens``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..rows import Alloc, as_bytes, gather_rows, reduce_rows
from .base import Plan, Transport, alloc_outputs, backend_str, return_positions, send_token_order

# torch >= 2.12 renamed all_gather_into_tensor to all_gather_single.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class CollectiveTransport(Transport):
    """All-to-all over ``torch.distributed`` (NCCL or gloo). See the module docstring."""

    name = "collective"

    @classmethod
    def supported(cls, group: Optional[dist.ProcessGroup] = None) -> Tuple[bool, str]:
        """Any gloo, NCCL or MPI group (``all_to_all_single``)."""
        if group is None:
            return True, "torch.distributed all_to_all_single (NCCL on GPUs, gloo on CPU)"
        be = backend_str(group)
        ok = be in ("gloo", "nccl", "mpi") or "nccl" in be or "gloo" in be
        return ok, f"torch.distributed all_to_all_single on the {be} group"

    def all_gather_ints(self, values: torch.Tensor, stage: str) -> torch.Tensor:
        values = values.to(device=self.device, dtype=torch.int64).contiguous()
        out = torch.empty((self.num_ranks * values.numel(),), dtype=torch.int64, device=self.device)
        work = _all_gather(out, values, group=self.group, async_op=True)
        self.waiter.wait(work, stage)
        return out.view(self.num_ranks, values.numel()).cpu()

    def _a2a(
        self, out: torch.Tensor, inp: torch.Tensor, out_splits: List[int], in_splits: List[int], stage: str
    ) -> None:
        if self.num_ranks == 1:
            out.copy_(inp)
            return
        if out.is_cuda:
            # Ordered on the current (comm) stream; no host wait.
            try:
                dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group)
            except RuntimeError as exc:  # the backend failed under the call (a peer exited)
                self.waiter.peer_failed(stage, exc)
        else:
            work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=True)
            self.waiter.wait(work, stage)

    def dispatch(self, plan: Plan, rows: Sequence[torch.Tensor], alloc: Alloc, num_sms: int = 20) -> List[torch.Tensor]:
        idx = send_token_order(plan)
        n_recv = plan.num_recv_tokens
        outs = alloc_outputs(plan, rows, alloc)
        if not rows:
            return outs
        # The token rows themselves: one all-to-all straight into the output.
        main = rows[0]
        send_main = gather_rows(main, idx) if idx.numel() != main.size(0) or plan.num_ranks > 1 else as_bytes(main)
        out0 = outs[0] if outs[0].size(0) == n_recv else outs[0][:n_recv]
        self._a2a(as_bytes(out0), send_main, plan.recv_counts, plan.send_counts, "dispatch rows")
        if len(rows) > 1:
            # The small extras, packed as bytes into one more all-to-all.
            if idx.numel():
                packed = [gather_rows(t, idx) for t in rows[1:]]
                widths = [p.size(1) for p in packed]
                send_aux = torch.cat(packed, dim=1) if len(packed) > 1 else packed[0]
            else:
                widths = [as_bytes(t).size(1) for t in rows[1:]]
                send_aux = torch.empty((0, sum(widths)), dtype=torch.uint8, device=main.device)
            recv_aux = torch.empty((n_recv, sum(widths)), dtype=torch.uint8, device=main.device)
            self._a2a(recv_aux, send_aux, plan.recv_counts, plan.send_counts, "dispatch extras")
            parts = recv_aux.split_with_sizes(widths, dim=1) if len(widths) > 1 else (recv_aux,)
            for o, part in zip(outs[1:], parts):
                as_bytes(o if o.size(0) == n_recv else o[:n_recv]).copy_(part)
        return outs

    def combine(
        self,
        plan: Plan,
        x: torch.Tensor,
        weights: Optional[torch.Tensor],
        biases: Sequence[torch.Tensor],
        alloc: Alloc,
        codec=None,
        num_sms: int = 20,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        n_recv = plan.num_recv_tokens
        S = sum(plan.send_counts)
        pos = return_positions(plan, x.device)
        xs = x if x.size(0) == n_recv else x[:n_recv]
        if codec is None:
            # One extra zero row last: where a token did not go.
            back = torch.empty((S + 1, x.size(1)), dtype=x.dtype, device=x.device)
            back[S].zero_()
            self._a2a(as_bytes(back[:S]), as_bytes(xs.contiguous()), plan.send_counts, plan.recv_counts, "combine rows")
        else:
            packed = torch.empty((S, codec.row_bytes), dtype=torch.uint8, device=x.device)
            self._a2a(packed, codec.encode(xs), plan.send_counts, plan.recv_counts, "combine rows")
            back = torch.cat(
                [codec.decode(packed, x.dtype), torch.zeros((1, x.size(1)), dtype=x.dtype, device=x.device)]
            )
        out = reduce_rows(back, pos, biases, x.dtype, alloc, nonnegative=True)
        out_w = None
        if weights is not None:
            back_w = torch.empty((S + 1, weights.size(1)), dtype=torch.float32, device=x.device)
            back_w[S].zero_()
            ws = weights if weights.size(0) == n_recv else weights[:n_recv]
            self._a2a(back_w[:S], ws.float().contiguous(), plan.send_counts, plan.recv_counts, "combine weights")
            out_w = reduce_rows(back_w, pos, (), torch.float32, alloc, nonnegative=True)
        return out, out_w
