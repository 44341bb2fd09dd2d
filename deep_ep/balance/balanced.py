"""Load-balanced dispatch over a :class:`deep_ep.Buffer`: logical expert ids in, physical replica slots on the wire.

:class:`BalancedDispatch` is the opt-in wiring of issue 8 into the normal
dispatch/combine path. It owns a placement (``phy2log``: ``P`` physical expert
slots, ``P // R`` per rank, hot experts replicated), a
:class:`~deep_ep.balance.LoadMonitor` and a
:class:`~deep_ep.balance.ReplicaRouter`. Per step:

1. :meth:`~BalancedDispatch.route` counts this rank's (token, expert) pairs
   per logical expert and all-reduces the ``[E]`` counts over the Buffer's
   group (one all-reduce of ``E`` int64 on the input's device; the only extra
   communication), records them in the monitor, and maps every pair to one
   replica of its expert with the load-aware quotas of that step (all ranks
   derive the same quotas from the same global counts, so idle GPUs take work
   from busy ones);
2. :meth:`~BalancedDispatch.dispatch` calls ``buffer.get_dispatch_layout`` and
   ``buffer.dispatch`` with the *physical* ids and ``num_experts = P``: every
   rank receives rows for its local slots, ``recv_topk_idx`` holds local slot
   indices ``0 .. P // R - 1`` (slot ``i`` of rank ``r`` is global slot
   ``r * P // R + i``, holding logical expert ``local_experts[i]``);
3. :meth:`~BalancedDispatch.combine` is ``buffer.combine`` (the handle knows
   where every row came from);
4. :meth:`~BalancedDispatch.maybe_replan` (call it once per training step)
   re-plans every ``every`` steps from the monitor's forecast and, when the
   placement changes, moves the expert weights and optimizer state to their new
   slots with :func:`~deep_ep.balance.migrate_experts` (bit-exact, in place).

Dispatch and combine go through :mod:`deep_ep.ops` (differentiable; the
returned event is then ``None``) when ``differentiable=True`` and grad mode
is on, or, by default, when grad mode is on and an input requires grad. As
with :mod:`deep_ep.ops`, backward is collective: every rank must take the same
path and run backward, so in training make sure every rank's expert output
depends on the weights (also with no rows received) or pass
``differentiable=True``.

The expert computation sees local slots, so its weights are stacked by local
slot, ``[P // R, ...]``, in the layout :func:`~deep_ep.balance.migrate_experts`
moves; replicas of one expert must hold identical weights (their gradients
are the expert's gradient split by tokens: sum them over the replicas of each
expert before the optimizer step, e.g. with :meth:`BalancedDispatch.sum_replica_grads`).
One ``BalancedDispatch`` per MoE layer.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from ..errors import DeepEPInputError, RemoteInputError
from ..waiting import Waiter
from .migrate import migrate_experts
from .migration_plan import placement_moves
from .monitor import LoadMonitor
from .placement import contiguous_phy2log
from .planner import rebalance_experts
from .router import ReplicaRouter, local_counts

__all__ = ["BalancedDispatch"]

log = logging.getLogger("deep_ep.balance")

_instances = itertools.count()
_AUTOGRAD_KWARGS = ("expert_alignment", "num_worst_tokens", "config")


def _needs_grad(flag: Optional[bool], *tensors: Any) -> bool:
    if flag is not None:
        return bool(flag) and torch.is_grad_enabled()
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


class BalancedDispatch:
    """Dispatch/combine of a :class:`deep_ep.Buffer` with expert replicas, load-aware routing and re-planning.

    Args:
        buffer: the :class:`deep_ep.Buffer` of the expert-parallel group
            (``R`` ranks); every rank builds its ``BalancedDispatch`` alike.
        num_experts: logical experts ``E`` (the ids of ``topk_idx``).
        num_slots: physical slots ``P`` (a multiple of ``R``, ``>= E``);
            ``P - E`` spare slots hold replicas. Default: ``len(phy2log)`` if
            given, else ``E`` (no spare slots: re-plans can then only move
            whole experts between ranks, no replicas).
        phy2log: the initial placement, int ``[P]`` (slot ``p`` on rank
            ``p // (P // R)``); default: experts contiguous (``E / R`` per
            rank, spare slots holding second copies of the rank's own
            experts), or, if ``R`` does not divide ``E``, the planner's
            placement for uniform load. Every rank must pass the same.
        window: steps of history the monitor keeps (and forecasts from).
        load_aware: split each replicated expert's pairs with the step's
            load-aware quotas (work stealing); ``False``: evenly.
        headroom, move_slack: passed to
            :func:`~deep_ep.balance.rebalance_experts` at re-plans.
        differentiable: ``True``: dispatch and combine through
            :mod:`deep_ep.ops` whenever grad mode is on; ``False``: never;
            ``None`` (default): when grad mode is on and an input requires
            grad.
        host_quotas: on CUDA, copy the step's ``E`` global counts to the host
            and solve the quotas there (numpy, tens of microseconds; one
            host synchronisation, which ``Buffer.dispatch`` makes anyway);
            ``False``: solve on the GPU without synchronising (a few small
            kernels per colour and sweep of
            :meth:`~deep_ep.balance.ReplicaRouter.quotas`).

    Attributes: ``buffer``, ``group``, ``num_experts``, ``num_slots``,
    ``num_ranks``, ``rank``, ``slots_per_rank``, ``monitor``, ``router``,
    ``steps`` (routed steps), ``replans`` (re-plans that changed the
    placement), ``last_moves`` (expert copies that crossed ranks at the last
    change).
    """

    def __init__(
        self,
        buffer,
        num_experts: int,
        *,
        num_slots: Optional[int] = None,
        phy2log=None,
        window: int = 100,
        load_aware: bool = True,
        headroom: float = 0.5,
        move_slack: float = 0.05,
        differentiable: Optional[bool] = None,
        host_quotas: bool = True,
    ) -> None:
        self.buffer = buffer
        self.group = buffer.group
        self.num_ranks = int(buffer.num_ranks)
        self.rank = int(buffer.rank)
        if not isinstance(num_experts, int) or num_experts <= 0:
            raise DeepEPInputError(f"num_experts must be a positive int, got {num_experts!r}")
        self.num_experts = num_experts
        R = self.num_ranks
        if phy2log is not None:
            p2l = torch.as_tensor(phy2log).detach().to("cpu", torch.int64).reshape(-1)
            if num_slots is not None and num_slots != p2l.numel():
                raise DeepEPInputError(f"num_slots={num_slots} but phy2log has {p2l.numel()} slots")
            num_slots = p2l.numel()
        elif num_slots is None:
            num_slots = num_experts
        if not isinstance(num_slots, int) or num_slots < num_experts or num_slots % R:
            raise DeepEPInputError(
                f"num_slots={num_slots!r} must be an int >= num_experts={num_experts} and a multiple of the {R} ranks"
            )
        if phy2log is None:
            if num_experts % R == 0:
                p2l = contiguous_phy2log(num_experts, R, (num_slots - num_experts) // R)
            else:
                p2l = rebalance_experts(torch.ones(1, num_experts, dtype=torch.float64), num_slots, 1, 1, R)[0][0]
        self.num_slots = num_slots
        self.slots_per_rank = num_slots // R
        self.load_aware = bool(load_aware)
        self.headroom = float(headroom)
        self.move_slack = float(move_slack)
        self.differentiable = differentiable
        self.host_quotas = bool(host_quotas)
        self._set_placement(p2l)  # validates (every expert needs a slot)
        self.monitor = LoadMonitor(num_experts, window=window)
        self.steps = 0
        self.replans = 0
        self.last_moves = 0
        self._last_plan_step = 0
        self._waiter = None
        if R > 1 and buffer.device.type != "cuda":
            self._waiter = Waiter(self.group, f"deep_ep/balanced/{next(_instances)}", float(buffer.timeout_s))

    def _collective(self, op, *args, stage: str) -> None:
        """``op(*args, group=...)`` over the group (nothing on one rank); bounded by the Buffer's ``timeout_s``
        on CPU groups (a rank that does not arrive is named), enqueued on the current stream on CUDA."""
        if self.num_ranks == 1:
            return
        if self._waiter is None:
            op(*args, group=self.group)
        else:
            self._waiter.wait(op(*args, group=self.group, async_op=True), f"BalancedDispatch {stage}")

    # ------------------------------------------------------------------ placement
    def _set_placement(self, phy2log: torch.Tensor) -> None:
        p2l = phy2log.to("cpu", torch.int64).reshape(-1).clone()
        if p2l.numel() != self.num_slots:
            raise DeepEPInputError(f"phy2log must have {self.num_slots} slots, got {p2l.numel()}")
        if p2l.numel() and (int(p2l.min()) < 0 or int(p2l.max()) >= self.num_experts):
            raise DeepEPInputError(f"phy2log holds ids outside [0, {self.num_experts})")
        self.router = ReplicaRouter(p2l, torch.bincount(p2l, minlength=self.num_experts), self.num_ranks)
        self.phy2log = p2l

    @property
    def local_experts(self) -> torch.Tensor:
        """int64 ``[P // R]`` (CPU): the logical expert of each of this rank's slots."""
        s = self.slots_per_rank
        return self.phy2log[self.rank * s : (self.rank + 1) * s].clone()

    # ------------------------------------------------------------------ per step
    def route(self, topk_idx: torch.Tensor) -> torch.Tensor:
        """Logical ``topk_idx [T, K]`` -> physical slots ``[T, K]`` (``-1`` kept) for this step.

        Collective over the group (one all-reduce of ``E + 1`` int64 on
        ``topk_idx``'s device: the per-expert counts and, on CPU, a count of
        invalid ids, so a bad input raises on every rank instead of hanging the
        others). Records the global counts in :attr:`monitor` and advances
        :attr:`steps`. On CUDA the only host synchronisation is the copy of
        the counts for ``host_quotas`` (none with ``host_quotas=False``);
        invalid ids there become the invalid slot ``P``, which
        ``Buffer.dispatch`` rejects on every rank.
        """
        if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2 or topk_idx.dtype.is_floating_point:
            raise DeepEPInputError("topk_idx must be an integer tensor [num_tokens, num_topk]")
        E = self.num_experts
        flat = topk_idx.reshape(-1).to(torch.int64)
        bad = (flat < -1) | (flat >= E)
        safe = torch.where(bad, torch.full_like(flat, -1), flat).view(topk_idx.shape)
        vec = torch.cat((local_counts(safe, E), bad.sum().view(1)))
        self._collective(dist.all_reduce, vec, stage="count all-reduce")
        if topk_idx.device.type == "cpu":
            n_bad, n_mine = int(vec[E]), int(bad.sum())
            if n_bad:
                if n_mine:
                    raise DeepEPInputError(f"rank {self.rank}: topk_idx holds {n_mine} id(s) outside [-1, {E})")
                raise RemoteInputError(
                    f"BalancedDispatch: other rank(s) passed {n_bad} expert id(s) outside [-1, {E}); see their error"
                )
        global_counts = vec[:E]
        self.monitor.update(global_counts)
        self.steps += 1
        quotas = None
        if self.load_aware and self.host_quotas and global_counts.device.type != "cpu":
            quotas = self.router.quotas(global_counts.cpu())  # one copy of E ints; numpy solve
        phys = self.router.route(safe, global_counts if self.load_aware else None, rank=self.rank, quotas=quotas)
        if topk_idx.device.type != "cpu":
            phys = torch.where(bad.view(topk_idx.shape), torch.full_like(phys, self.num_slots), phys)
        return phys

    def dispatch(
        self,
        x,
        topk_idx: Optional[torch.Tensor] = None,
        topk_weights: Optional[torch.Tensor] = None,
        *,
        handle=None,
        **kwargs,
    ):
        """:meth:`Buffer.dispatch` with logical ``topk_idx`` (mapped by :meth:`route`).

        Returns ``(recv_x, recv_topk_idx, recv_topk_weights,
        num_recv_tokens_per_expert_list, handle, event)`` as ``Buffer.dispatch``,
        where ``recv_topk_idx`` and the per-expert list refer to this rank's
        local *slots* (:attr:`local_experts` gives their logical experts).
        Other keyword arguments go to ``Buffer.dispatch``. With ``handle``
        (cached dispatch) nothing is routed or counted. Differentiable (through
        :func:`deep_ep.ops.dispatch`, event ``None``; only
        ``expert_alignment``, ``num_worst_tokens`` and ``config`` allowed) as
        the class docstring says (by default when ``x`` or ``topk_weights``
        requires grad).
        """
        if handle is not None:
            return self.buffer.dispatch(x, handle=handle, **kwargs)
        if topk_idx is None:
            raise DeepEPInputError("BalancedDispatch.dispatch needs topk_idx (or a handle)")
        phys = self.route(topk_idx)
        if _needs_grad(self.differentiable, x, topk_weights):
            from .. import ops

            self._check_autograd_kwargs(kwargs)
            return ops.dispatch(self.buffer, x, phys, topk_weights, num_experts=self.num_slots, **kwargs) + (None,)
        per_rank, _, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(phys, self.num_slots)
        return self.buffer.dispatch(
            x,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=phys,
            topk_weights=topk_weights,
            **kwargs,
        )

    def combine(self, x: torch.Tensor, handle, topk_weights: Optional[torch.Tensor] = None, bias=None, **kwargs):
        """:meth:`Buffer.combine` (returns ``(combined_x, combined_topk_weights, event)``); differentiable
        (through :func:`deep_ep.ops.combine`, event ``None``) as the class docstring says (by default when
        ``x``, ``topk_weights`` or a bias requires grad)."""
        if _needs_grad(self.differentiable, x, topk_weights, *(bias if isinstance(bias, (list, tuple)) else (bias,))):
            from .. import ops

            extra = {k: v for k, v in kwargs.items() if k != "config"}
            if extra:
                raise DeepEPInputError(f"differentiable combine takes only config, got {sorted(extra)}")
            return ops.combine(self.buffer, x, handle, topk_weights, bias, **kwargs) + (None,)
        return self.buffer.combine(x, handle, topk_weights=topk_weights, bias=bias, **kwargs)

    @staticmethod
    def _check_autograd_kwargs(kwargs: Dict[str, Any]) -> None:
        extra = sorted(k for k in kwargs if k not in _AUTOGRAD_KWARGS)
        if extra:
            raise DeepEPInputError(f"differentiable dispatch takes only {list(_AUTOGRAD_KWARGS)}, got {extra}")

    # ------------------------------------------------------------------ gradients of replicas
    def sum_replica_grads(self, params, grads=None) -> None:
        """Make every replica's gradient the gradient of its logical expert (collective).

        ``params``: tensors (a dict, list or one tensor) stacked by local slot
        ``[P // R, ...]``. ``grads``: their gradients in the same order (a
        list; default: each tensor's ``.grad``, missing ones zero); they may
        have a wider dtype than the parameter (e.g. float64 gradients of
        float32 weights). Per expert, the gradients of all its replicas are
        summed in float64 (one all-reduce of an ``[E, ...]`` table per tensor)
        and every replica's ``.grad`` becomes that sum in the parameter's
        dtype, so replicas stay identical after the optimizer step.
        """
        items = (
            list(params.values())
            if isinstance(params, dict)
            else ([params] if isinstance(params, torch.Tensor) else list(params))
        )
        grads = [p.grad for p in items] if grads is None else list(grads)
        if len(grads) != len(items):
            raise DeepEPInputError(f"got {len(grads)} gradients for {len(items)} tensors")
        for p, g in zip(items, grads):
            local = self.local_experts.to(p.device)
            g = torch.zeros_like(p) if g is None else g
            table = torch.zeros((self.num_experts,) + tuple(p.shape[1:]), dtype=torch.float64, device=p.device)
            table.index_add_(0, local, g.to(torch.float64))
            self._collective(dist.all_reduce, table, stage="gradient all-reduce")
            p.grad = table.index_select(0, local).to(p.dtype)

    # ------------------------------------------------------------------ re-planning
    def plan(self, horizon: Optional[int] = None) -> torch.Tensor:
        """The placement the planner proposes now (int64 ``[P]``, CPU), from the monitor's forecast over
        ``horizon`` steps, adapting the current one. Rank 0 plans and broadcasts it (collective), so every
        rank holds the same placement."""
        dev = self.buffer.device
        out = torch.empty(self.num_slots, dtype=torch.int64, device=dev)
        if self.rank == 0:
            weight = self.monitor.forecast(horizon).view(1, -1)
            new = rebalance_experts(
                weight,
                self.num_slots,
                1,
                1,
                self.num_ranks,
                headroom=self.headroom,
                move_slack=self.move_slack,
                prev_phy2log=self.phy2log.view(1, -1),
            )[0][0]
            out.copy_(new)
        src = 0 if self.group in (None, dist.group.WORLD) else dist.get_global_rank(self.group, 0)
        self._collective(dist.broadcast, out, src, stage="plan broadcast")
        return out.cpu()

    def maybe_replan(
        self, every: int, params, optimizer: Optional[torch.optim.Optimizer] = None, *, force: bool = False
    ) -> bool:
        """Every ``every`` routed steps: re-plan from the forecast and migrate the experts if the placement changed.

        Collective over the group (call it at the same point on every rank,
        e.g. after the optimizer step). ``params``: this rank's expert
        tensors stacked by local slot (a dict name -> tensor, a list or one
        tensor, as :func:`~deep_ep.balance.migrate_experts`); they are
        migrated in place (``.data`` replaced, gradients moved), with the
        state of ``optimizer`` when given. Returns ``True`` when the
        placement changed (weights moved), ``False`` otherwise (also when
        it is not time yet or nothing was recorded; ``force=True`` re-plans
        now).
        """
        if not isinstance(every, int) or every < 1:
            raise DeepEPInputError(f"every must be a positive int, got {every!r}")
        if len(self.monitor) == 0 or (not force and self.steps - self._last_plan_step < every):
            return False
        self._last_plan_step = self.steps
        new = self.plan(horizon=every)
        if torch.equal(new, self.phy2log):
            return False
        old = self.phy2log
        migrate_experts(params, old, new, self.group, optimizer, inplace=True, timeout_s=self.buffer.timeout_s)
        self.last_moves = placement_moves(old, new, self.num_ranks)
        self._set_placement(new)
        self.replans += 1
        log.debug(
            "BalancedDispatch rank %d: re-plan at step %d moved %d expert copies",
            self.rank,
            self.steps,
            self.last_moves,
        )
        return True

    def imbalance(self) -> Dict[str, float]:
        """Per-GPU load figures of the current placement over the monitor's window (reads back to the host):
        ``max_over_mean``, ``std_over_mean`` (mean over steps) and their p99, as
        :meth:`LoadMonitor.imbalance`, with this dispatcher's split (load-aware or even)."""
        return self.monitor.imbalance(self.phy2log, self.router.logcnt, self.num_ranks, balanced=self.load_aware)
