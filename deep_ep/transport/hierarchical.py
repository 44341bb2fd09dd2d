"""The ``hierarchical`` transport: one copy of a token per node across nodes, forwarded inside the node.

Ranks form ``N`` nodes of ``P`` consecutive ranks (hostnames, or
``ranks_per_node=`` / ``DEEP_EP_RANKS_PER_NODE`` to emulate nodes on one
host). Two families of process groups carry the rows: *rails* (the ranks
with the same local index on every node; what crosses nodes) and *nodes*
(the ranks of one node). DeepEP's internode design, on torch.distributed:

- **dispatch**: each token goes once to every node that holds one of its
  target ranks, to the rank with the sender's local index there (one
  ``all_to_all_single`` on the rail), with the mask of that node's targets;
  that rank forwards it to those targets (one ``all_to_all_single`` on the
  node); the receiver puts the rows into the usual order (source rank, then
  token). Across nodes a token costs one row per destination node, not one
  per destination rank.
- **combine**: the reverse; each forwarding rank first sums, in local rank
  order and in float32, the rows its node returns for a token, casts the
  partial sum to the row dtype and sends one row per (token, node) back; the
  source sums the partials in node order (float32) and adds the biases.
  This is the reference's ``ranks_per_node`` order, not the flat
  transports' (ranks in order, one float32 sum): where rows of one node
  cancel, the partial rounded to bf16 can lose what the flat sum keeps, and a
  float16 partial can overflow (as in DeepEP, which also sends 16-bit
  partials).

Every fresh dispatch reads its layout on the host (no ``num_worst_tokens``
device path). ``DEEP_EP_RANKS_PER_NODE`` must be the same on every rank.

Inside a node the collective path moves the rows (NCCL, which takes NVLink,
on GPUs; gloo on CPU). ``last_stats`` holds the rows and bytes the last call
sent across nodes.
"""

from __future__ import annotations

import socket
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .. import layout
from ..errors import DeepEPInputError
from ..rows import Alloc, as_bytes, reduce_rows
from ..settings import Settings
from ..waiting import Waiter
from .base import Plan, Transport, alloc_outputs, send_positions
from .collective import CollectiveTransport

__all__ = ["HierarchicalTransport", "ranks_per_node"]


def ranks_per_node(group: dist.ProcessGroup, given: Optional[int] = None) -> int:
    """Ranks per node: ``given`` (the Buffer's ``ranks_per_node`` setting, which ``DEEP_EP_RANKS_PER_NODE``
    fills), else from the hostnames (consecutive ranks on one host, every host the same count). Collective
    when it reads hostnames."""
    R = dist.get_world_size(group)
    if given is not None:
        if given < 1 or R % given:
            raise DeepEPInputError(f"ranks_per_node={given} must divide the group size {R}")
        return given
    names: List[Any] = [None] * R
    dist.all_gather_object(names, socket.gethostname(), group=group)
    P = names.count(names[0])
    ok = R % P == 0 and all(names[n * P : (n + 1) * P] == [names[n * P]] * P for n in range(R // P))
    if not ok:
        raise DeepEPInputError(
            f"the ranks of the group are not in blocks of equal size per host ({names}); "
            f"pass ranks_per_node= (or DEEP_EP_RANKS_PER_NODE)"
        )
    return P


class HierarchicalTransport(CollectiveTransport):
    """See the module docstring. Metadata and the small exchanges use the collective transport's."""

    name = "hierarchical"

    @classmethod
    def supported(cls, group: Optional[dist.ProcessGroup] = None) -> Tuple[bool, str]:
        """The default group only (it builds rail and node groups from it)."""
        if group is not None and group is not dist.group.WORLD and dist.get_world_size(group) != dist.get_world_size():
            return False, "needs the default process group (it builds rail and node groups)"
        return True, "nodes from the hostnames (or ranks_per_node / DEEP_EP_RANKS_PER_NODE)"

    def __init__(
        self,
        group: dist.ProcessGroup,
        device: torch.device,
        waiter: Waiter,
        settings: Settings,
        num_nvl_bytes: int = 0,
    ) -> None:
        Transport.__init__(self, group, device, waiter, settings, num_nvl_bytes)
        if dist.get_world_size() != self.num_ranks:
            raise DeepEPInputError(
                "backend='hierarchical' builds its rail and node groups from the default "
                "process group: use it on the default group (every rank of the job)"
            )
        P = ranks_per_node(group, settings.ranks_per_node)
        self.P, self.N = P, self.num_ranks // P
        self.ranks_per_node = P
        self.node, self.local = self.rank // P, self.rank % P
        g = [dist.get_global_rank(group, r) if group is not dist.group.WORLD else r for r in range(self.num_ranks)]
        self.rail = self.node_group = None
        for i in range(P):  # every rank creates every group, in the same order
            grp = dist.new_group([g[m * P + i] for m in range(self.N)])
            if i == self.local:
                self.rail = grp
        for m in range(self.N):
            grp = dist.new_group([g[m * P + j] for j in range(P)])
            if m == self.node:
                self.node_group = grp
        self.last_stats: Dict[str, int] = {}

    def _a2a_on(
        self,
        group,
        size: int,
        out: torch.Tensor,
        inp: torch.Tensor,
        out_splits: List[int],
        in_splits: List[int],
        stage: str,
    ) -> None:
        if size == 1:
            out.copy_(inp)
            return
        if out.is_cuda:
            try:
                dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
            except RuntimeError as exc:  # the backend failed under the call (a peer exited)
                self.waiter.peer_failed(stage, exc)
        else:
            work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=True)
            self.waiter.wait(work, stage)

    # ---------------------------------------------------------------- schedule (once per plan)
    def _schedule(self, plan: Plan) -> Dict[str, Any]:
        sched = plan.cache.get(("hierarchical",))
        if sched is not None:
            return sched
        if plan.counts is None:
            raise DeepEPInputError(
                "the hierarchical transport needs the counts on the host (it has no device-side num_worst_tokens path)"
            )
        P, N, me, node, local = self.P, self.N, self.rank, self.node, self.local
        C = plan.counts.tolist()
        mask = plan.is_token_in_rank
        T = mask.size(0)
        node_mask = mask.reshape(T, N, P).any(dim=2)
        mine = node_mask.sum(dim=0).to(torch.int64)
        Cn = self.all_gather_ints(mine, "hierarchical node counts").tolist()  # Cn[s][m]
        idx1 = layout.send_order(node_mask)  # node-major, token order
        sel_nodes = torch.repeat_interleave(torch.arange(N, device=mask.device), mine.to(mask.device))
        mask1 = mask.reshape(T, N, P)[idx1, sel_nodes]
        send1 = mine.tolist()
        recv1 = [Cn[m * P + local][node] for m in range(N)]
        # stage 2: rows this rank forwards to local rank d (sources m*P + local, every node m)
        send2 = [sum(C[m * P + local][node * P + d] for m in range(N)) for d in range(P)]
        recv2 = [sum(C[m * P + j][me] for m in range(N)) for j in range(P)]
        # final order: source rank ascending; recv2 holds, per forwarder j, sources (m, j) for m ascending
        first = [sum(C[s2][me] for s2 in range(s)) for s in range(self.num_ranks)]
        at, order = 0, []
        for j in range(P):
            for m in range(N):
                s = m * P + j
                order.append((first[s], at, C[s][me]))
                at += C[s][me]
        order.sort()
        blocks = [torch.arange(a, a + n, dtype=torch.int64) for _, a, n in order if n]
        sched = dict(
            idx1=idx1,
            mask1=mask1,
            send1=send1,
            recv1=recv1,
            send2=send2,
            recv2=recv2,
            perm=(torch.cat(blocks) if blocks else torch.zeros(0, dtype=torch.int64)).to(mask.device),
            node_mask=node_mask,
            internode_rows=sum(send1) - send1[node],
        )
        plan.cache[("hierarchical",)] = sched
        return sched

    def _stage2_order(self, sched: Dict[str, Any], m2: torch.Tensor) -> torch.Tensor:
        """Rows of stage 1 to forward, destination-major (cached: the masks are the plan's)."""
        idx2 = sched.get("idx2")
        if idx2 is None:
            idx2 = sched["idx2"] = layout.send_order(m2)
        return idx2

    # ---------------------------------------------------------------- dispatch
    def dispatch(self, plan: Plan, rows: Sequence[torch.Tensor], alloc: Alloc, num_sms: int = 20) -> List[torch.Tensor]:
        outs = alloc_outputs(plan, rows, alloc)
        if not rows:
            return outs
        sched = self._schedule(plan)
        P, dev = self.P, rows[0].device
        parts = [as_bytes(t) for t in rows]
        widths = [p.size(1) for p in parts]
        W = sum(widths)
        packed = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        send1 = torch.cat([packed.index_select(0, sched["idx1"]), sched["mask1"].to(torch.uint8)], dim=1)
        recv1 = torch.empty((sum(sched["recv1"]), W + P), dtype=torch.uint8, device=dev)
        self._a2a_on(self.rail, self.N, recv1, send1.contiguous(), sched["recv1"], sched["send1"], "dispatch (nodes)")
        m2 = recv1[:, W:].bool()
        if "m2" not in sched:
            sched["m2"] = m2
        idx2 = self._stage2_order(sched, m2)
        send2 = recv1[:, :W].index_select(0, idx2)
        recv2 = torch.empty((sum(sched["recv2"]), W), dtype=torch.uint8, device=dev)
        self._a2a_on(self.node_group, P, recv2, send2, sched["recv2"], sched["send2"], "dispatch (in node)")
        final = recv2.index_select(0, sched["perm"])
        n = final.size(0)
        at = 0
        for o, w in zip(outs, widths):
            as_bytes(o[:n]).copy_(final[:, at : at + w])
            at += w
        self.last_stats = dict(
            op="dispatch", internode_rows=sched["internode_rows"], internode_bytes=sched["internode_rows"] * (W + P)
        )  # rows + target mask
        return outs

    # ---------------------------------------------------------------- combine
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
        sched = self._schedule(plan)
        if "m2" not in sched:
            raise DeepEPInputError("combine before any dispatch of this handle on the hierarchical transport")
        n_recv = plan.num_recv_tokens
        xs = x if x.size(0) == n_recv else x[:n_recv]
        out = self._combine_rows(sched, xs.contiguous(), x.dtype, biases, alloc, plan.num_tokens, codec)
        out_w = None
        row_bytes = xs.size(1) * xs.element_size()
        if weights is not None:
            ws = weights if weights.size(0) == n_recv else weights[:n_recv]
            out_w = self._combine_rows(sched, ws.float().contiguous(), torch.float32, (), alloc, plan.num_tokens)
            row_bytes += ws.size(1) * 4
        rows = sum(sched["recv1"]) - sched["recv1"][self.node]  # partials sent back to other nodes
        self.last_stats = dict(op="combine", internode_rows=rows, internode_bytes=rows * row_bytes)
        return out, out_w

    def _combine_rows(
        self, sched, xs: torch.Tensor, dtype: torch.dtype, biases, alloc, T: int, codec=None
    ) -> torch.Tensor:
        P, N, dev, H = self.P, self.N, xs.device, xs.size(1)
        # back to the forwarders: rows in recv2 order (the inverse of the final permutation), encoded with
        # the codec if any (decoded there: the node partials and what crosses nodes stay 16-bit)
        rows = xs if codec is None else codec.encode(xs)
        back2_send = torch.empty_like(rows)
        back2_send.index_copy_(0, sched["perm"], rows)
        back2 = torch.empty((sum(sched["send2"]), rows.size(1)), dtype=rows.dtype, device=dev)
        self._a2a_on(
            self.node_group,
            P,
            as_bytes(back2),
            as_bytes(back2_send),
            sched["send2"],
            sched["recv2"],
            "combine (in node)",
        )
        if codec is not None:
            back2 = codec.decode(back2, xs.dtype)
        # partial sum per stage-1 row over the local ranks that got it (local order), cast to the row dtype
        pos2 = sched.get("pos2")
        if pos2 is None:
            pos2 = sched["pos2"] = send_positions(sched["m2"], sched["send2"])
        local = lambda shape, dt: torch.empty(shape, dtype=dt, device=dev)  # noqa: E731 (a temporary)
        partial = reduce_rows(back2, pos2, (), xs.dtype, local)
        back1 = torch.empty((sum(sched["send1"]), H), dtype=xs.dtype, device=dev)
        self._a2a_on(
            self.rail,
            N,
            as_bytes(back1),
            as_bytes(partial.contiguous()),
            sched["send1"],
            sched["recv1"],
            "combine (nodes)",
        )
        pos1 = sched.get("pos1")
        if pos1 is None:
            pos1 = sched["pos1"] = send_positions(sched["node_mask"], sched["send1"])
        return reduce_rows(back1, pos1, biases, dtype, alloc)
