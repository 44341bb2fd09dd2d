"""Replica-aware routing: every (token, expert) pair to exactly one replica of its expert.

:class:`ReplicaRouter` takes a placement (``phy2log``, ``logcnt`` of
:func:`~deep_ep.balance.rebalance_experts`) and maps ``topk_idx`` (logical
experts) to physical slots.

Split of an expert's pairs among its replicas
----------------------------------------------
* ``route(topk_idx)`` (no counts): the plan's split, even among replicas, from
  this rank's own pairs only.
* ``route(topk_idx, global_counts)``: load-aware split (work stealing). From
  the step's global per-expert counts every rank computes the same integer
  quota of every replica (:meth:`ReplicaRouter.quotas`); the quotas minimise
  the per-GPU load of *this step*: experts with a single replica put their
  whole count on their GPU, and the count of a replicated expert is
  water-filled over its replicas' GPUs so that lightly loaded GPUs take work
  from busy ones.

Quota algorithm (deterministic, integer, vectorised)
----------------------------------------------------
The target is the balanced fractional assignment: the per-GPU loads that
minimise ``sum_g load_g**2`` over all splits, which is also the min-max
(lexicographically smallest) load vector. It is reached by block
coordinate descent: the replicated experts are coloured at construction so
that experts of one colour never share a GPU; one sweep visits the colours
in turn and, for all experts of the colour at once, re-splits each expert's
count by integer water-filling against the load its GPUs carry from
everything else (a re-split that would move at most one pair per replica is
skipped: it only reshuffles rounding remainders). No step raises
``sum load**2``. All arithmetic is int64 (exact and order-independent), so
equal inputs give bit-identical quotas on every rank; CPU tensors take a numpy
implementation of the same integer algorithm (faster for these small arrays;
tested equal to the torch one, which serves GPU tensors). At most ``sweeps``
sweeps run (default 8; on GPU all of them, without host synchronisation; on
CPU the loop stops at a fixed point, which changes nothing). There is no
Python loop over tokens or experts, only over ``sweeps x colours`` (a handful
each).

Filling the quotas across ranks
-------------------------------
Pairs of one expert are numbered globally: rank ``r``'s pairs come after the
pairs of ranks ``< r`` (token order inside a rank), and position ``i`` goes
to the replica whose cumulative quota range ``[Q_<j, Q_<=j)`` contains it.
``global_counts`` can be given two ways:

* ``[R, E]``, the per-rank counts of every rank (one ``all_gather`` of E ints,
  :meth:`ReplicaRouter.exchange_counts`): every rank knows its offset, the
  ranks fill each replica's quota exactly (``rank`` says which row is ours;
  default: this process's rank in ``group``).
* ``[E]``, the all-reduced totals: each rank splits its own pairs in
  proportion to the quotas (largest remainder, rotated by rank); per-replica
  totals then match the quotas up to about one pair per rank.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..errors import DeepEPInputError
from .placement import host_int64, replica_table

__all__ = ["ReplicaRouter", "waterfill", "local_counts"]

log = logging.getLogger("deep_ep.balance")

_BIG = 1 << 40  # padding level for absent replicas in water-filling (int64-safe)
_KEY = 1 << 32  # per-expert stride of the searchsorted key (counts < 2**32)


def waterfill(counts: torch.Tensor, base: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Integer water-filling, vectorised over rows.

    Splits ``counts[i]`` (int64 ``[n]``) over the columns of row ``i`` where
    ``valid`` is true so that ``base + share`` is as level as possible: the
    lowest bins are raised to a common level ``h`` and the last units go one
    each to the lowest bins (ties to the lower column). Returns int64
    ``[n, m]`` shares, ``>= 0``, zero where not valid, rows summing to ``counts``.
    """
    n, m = base.shape
    dev = base.device
    b = torch.where(valid, base, torch.full_like(base, _BIG))
    bs, perm = torch.sort(b, dim=1, stable=True)
    csum = torch.cumsum(bs, dim=1)
    k = torch.arange(1, m + 1, dtype=torch.int64, device=dev)
    need = k * bs - csum  # units to raise the first k bins to bs[k-1]
    c = counts.view(n, 1)
    kk = (need <= c).sum(dim=1, keepdim=True).clamp(min=1)  # number of bins that get water
    s_kk = torch.gather(csum, 1, kk - 1)
    tot = c + s_kk
    h0 = torch.div(tot, kk, rounding_mode="floor")
    rem = tot - h0 * kk
    col = torch.arange(m, dtype=torch.int64, device=dev).view(1, m)
    share_sorted = torch.where(col < kk, h0 - bs + (col < rem).to(torch.int64), torch.zeros_like(bs))
    out = torch.zeros_like(share_sorted)
    out.scatter_(1, perm, share_sorted)
    return torch.where(valid, out, torch.zeros_like(out))


def _waterfill_np(counts: np.ndarray, base: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """:func:`waterfill` in numpy (same integer algorithm, same result)."""
    n, m = base.shape
    b = np.where(valid, base, _BIG)
    perm = np.argsort(b, axis=1, kind="stable")
    flat = (perm + (np.arange(n, dtype=np.int64) * m)[:, None]).ravel()
    bs = b.ravel()[flat].reshape(n, m)
    csum = np.cumsum(bs, axis=1)
    need = np.arange(1, m + 1, dtype=np.int64) * bs - csum
    c = counts[:, None]
    kk = np.maximum((need <= c).sum(1), 1)
    tot = counts + csum[np.arange(n), kk - 1]
    h0 = tot // kk
    rem = tot - h0 * kk
    col = np.arange(m, dtype=np.int64)
    share_sorted = np.where(col < kk[:, None], h0[:, None] - bs + (col < rem[:, None]), 0)
    out = np.empty(n * m, dtype=np.int64)
    out[flat] = share_sorted.ravel()
    return np.where(valid, out.reshape(n, m), 0)


def _pair_counts(flat: torch.Tensor, num_experts: int):
    """``(e, n)``: the expert of every pair of ``flat`` int64 ``[N]`` with ``-1`` mapped to a dummy expert
    ``num_experts``, and int64 ``[num_experts + 1]`` pairs per expert (the dummy last). No host sync."""
    e = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts))
    n = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    n.scatter_add_(0, e, torch.ones_like(e))
    return e, n


def local_counts(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 ``[num_experts]`` (token, expert) pairs per expert of ``topk_idx`` (``-1`` ignored), on its
    device, without host synchronisation (ids must lie in ``[-1, num_experts)``)."""
    return _pair_counts(topk_idx.reshape(-1).to(torch.int64), num_experts)[1][:num_experts].contiguous()


class ReplicaRouter:
    """Maps logical ``topk_idx`` to physical replica slots of a placement.

    Args:
        phy2log: int ``[P]`` or ``[layers, P]``: logical expert of every slot;
            slot ``p`` is on GPU ``p // (P // num_gpus)``.
        logcnt: int ``[E]`` or ``[layers, E]``: replicas per expert (checked
            against ``phy2log``; its length gives ``E``).
        num_gpus: GPUs of the placement.
        layer: which layer to route when the maps have several (default: the
            maps must hold exactly one layer).
        sweeps: coordinate-descent sweeps of the quota computation (at most;
            on CPU it stops early at a fixed point, which gives the same result).

    Attributes: ``num_experts``, ``num_slots``, ``num_gpus``, ``slots_per_gpu``,
    ``slot_gpu`` (int64 ``[P]``), ``replicas`` (int64 ``[E, max_replicas]``
    slots of every expert, ascending, ``-1`` padded).
    """

    def __init__(self, phy2log, logcnt, num_gpus: int, *, layer: Optional[int] = None, sweeps: int = 8) -> None:
        p2l = torch.as_tensor(phy2log)
        cnt = torch.as_tensor(logcnt)
        if p2l.dim() == 2:
            if layer is None:
                if p2l.shape[0] != 1:
                    raise DeepEPInputError(f"phy2log has {p2l.shape[0]} layers; pass layer=")
                layer = 0
            p2l = p2l[layer]
            cnt = cnt[layer] if cnt.dim() == 2 else cnt
        elif cnt.dim() == 2:
            cnt = cnt[0 if layer is None else layer]
        if p2l.dim() != 1 or cnt.dim() != 1:
            raise DeepEPInputError("phy2log must be [P] or [layers, P] and logcnt [E] or [layers, E]")
        self.device = p2l.device
        host = host_int64(p2l)
        num_experts = int(cnt.numel())
        num_slots = int(host.shape[0])
        if not isinstance(num_gpus, int) or num_gpus <= 0 or num_slots % num_gpus:
            raise DeepEPInputError(f"num_gpus={num_gpus!r} must be a positive divisor of the {num_slots} slots")
        if host.size and (host.min() < 0 or host.max() >= num_experts):
            raise DeepEPInputError("phy2log holds expert ids outside [0, num_experts)")
        counts = np.bincount(host, minlength=num_experts)
        if not np.array_equal(counts, host_int64(cnt)):
            raise DeepEPInputError("logcnt does not match phy2log")
        if (counts == 0).any():
            raise DeepEPInputError(f"experts without a replica: {np.nonzero(counts == 0)[0][:8].tolist()}")
        self.num_experts = num_experts
        self.num_slots = num_slots
        self.num_gpus = num_gpus
        self.slots_per_gpu = num_slots // num_gpus
        self.sweeps = int(sweeps)
        slot_gpu = np.arange(num_slots) // self.slots_per_gpu
        replicas = replica_table(host, counts)
        self._host_replicas = replicas
        self._build_units(host, slot_gpu, counts)
        self._cache: Dict[torch.device, Dict[str, object]] = {}
        self.phy2log = torch.as_tensor(host, dtype=torch.int64)
        self.logcnt = torch.as_tensor(counts, dtype=torch.int64)
        self.slot_gpu = torch.as_tensor(slot_gpu, dtype=torch.int64)
        self.replicas = torch.as_tensor(replicas, dtype=torch.int64)

    # ------------------------------------------------------------------ construction helpers
    def _build_units(self, host: np.ndarray, slot_gpu: np.ndarray, counts: np.ndarray) -> None:
        """Group slots into units (one expert on one GPU) and colour the replicated experts."""
        E, G = self.num_experts, self.num_gpus
        # unit = (expert, gpu); slots of a unit share its quota evenly
        key = host * G + slot_gpu
        ukeys, slot_unit, unit_slots = np.unique(key, return_inverse=True, return_counts=True)
        unit_expert = ukeys // G
        unit_gpu = ukeys % G
        units_per_expert = np.bincount(unit_expert, minlength=E)
        self._slot_unit = slot_unit.astype(np.int64)
        self._unit_slots = unit_slots.astype(np.int64)
        rigid = units_per_expert == 1
        # GPU of every single-unit expert (G = dummy bin for replicated experts)
        rigid_gpu = np.full(E, G, dtype=np.int64)
        ru = np.nonzero(rigid[unit_expert])[0]
        rigid_gpu[unit_expert[ru]] = unit_gpu[ru]
        self._rigid_gpu = rigid_gpu
        rep_experts = np.nonzero(~rigid)[0]
        self._rep_experts = rep_experts
        mu = int(units_per_expert.max()) if E else 1
        nr = rep_experts.shape[0]
        rep_gpu = np.full((nr, max(mu, 1)), G, dtype=np.int64)
        row_of = np.full(E, -1, dtype=np.int64)
        row_of[rep_experts] = np.arange(nr)
        if nr:
            sel = np.nonzero(~rigid[unit_expert])[0]  # units of replicated experts (sorted)
            r = row_of[unit_expert[sel]]
            first = np.concatenate(([0], np.cumsum(np.bincount(r, minlength=nr))[:-1]))
            col = np.arange(sel.shape[0]) - first[r]
            rep_gpu[r, col] = unit_gpu[sel]
        self._rep_gpu = rep_gpu
        # where each unit's quota comes from in concat(counts [E], q [nr * mu]): a single-unit
        # expert's unit takes the expert's whole count, a replicated expert's unit its water-filled share
        unit_src = unit_expert.astype(np.int64).copy()
        if nr:
            unit_src[sel] = E + r * rep_gpu.shape[1] + col
        self._unit_src = unit_src
        # position of every slot inside its unit (slot order); the first ones take the remainder
        order = np.argsort(self._slot_unit, kind="stable")
        ufirst = np.concatenate(([0], np.cumsum(self._unit_slots)[:-1]))
        pos = np.empty_like(self._slot_unit)
        pos[order] = np.arange(order.shape[0]) - ufirst[self._slot_unit[order]]
        self._slot_pos = pos
        self._numpy_on_cpu = True
        # greedy colouring: experts of one colour share no GPU
        colours: List[List[int]] = []
        used: List[set] = []
        order = sorted(range(nr), key=lambda i: (-int((rep_gpu[i] < G).sum()), i))
        for i in order:
            gpus = set(int(g) for g in rep_gpu[i] if g < G)
            for c, u in enumerate(used):
                if not (u & gpus):
                    colours[c].append(i)
                    u |= gpus
                    break
            else:
                colours.append([i])
                used.append(set(gpus))
        self._colours = [np.array(sorted(c), dtype=np.int64) for c in colours]
        self.num_colours = len(colours)

    def _tables(self, device: torch.device) -> Dict[str, object]:
        dev = torch.device(device)
        t = self._cache.get(dev)
        if t is None:
            i64 = dict(dtype=torch.int64, device=dev)
            t = {
                "rigid_gpu": torch.as_tensor(self._rigid_gpu, **i64),
                "rep_experts": torch.as_tensor(self._rep_experts, **i64),
                "rep_gpu": torch.as_tensor(self._rep_gpu, **i64),
                "rep_valid": torch.as_tensor(self._rep_gpu < self.num_gpus, dtype=torch.bool, device=dev),
                "colours": [torch.as_tensor(c, **i64) for c in self._colours],
                "replicas": torch.as_tensor(self._host_replicas, **i64),
                "rep_mask": torch.as_tensor(self._host_replicas >= 0, dtype=torch.bool, device=dev),
                "slot_unit": torch.as_tensor(self._slot_unit, **i64),
                "unit_slots": torch.as_tensor(self._unit_slots, **i64),
                "unit_src": torch.as_tensor(self._unit_src, **i64),
                "slot_pos": torch.as_tensor(self._slot_pos, **i64),
                "phy2log": torch.as_tensor(self.phy2log.numpy(), **i64),
                "slot_gpu": torch.as_tensor(self.slot_gpu.numpy(), **i64),
            }
            self._cache[dev] = t
        return t

    # ------------------------------------------------------------------ quotas
    def quotas(self, global_counts: torch.Tensor, sweeps: Optional[int] = None) -> torch.Tensor:
        """Per-slot quotas (int64 ``[P]``) for this step's global per-expert counts.

        ``global_counts``: int ``[E]`` (or ``[R, E]``, summed over ranks). The
        quotas of an expert's slots sum to its count; the per-GPU sums are as
        even as the placement allows. Deterministic: equal counts give
        bit-identical quotas on every rank and device (int64 arithmetic; the
        CPU path runs the same integer algorithm in numpy, the GPU path in torch).
        """
        c = torch.as_tensor(global_counts)
        if c.dim() == 2:
            c = c.sum(0)
        c = c.to(torch.int64)
        if c.shape != (self.num_experts,):
            raise DeepEPInputError(f"global_counts must have {self.num_experts} experts, got {tuple(c.shape)}")
        n_sweeps = self.sweeps if sweeps is None else int(sweeps)
        if c.device.type == "cpu" and self._numpy_on_cpu:
            return torch.from_numpy(self._quotas_numpy(c.numpy(), n_sweeps))
        return self._quotas_torch(c, n_sweeps)

    def _quotas_numpy(self, c: np.ndarray, n_sweeps: int) -> np.ndarray:
        G = self.num_gpus
        load = np.zeros(G + 1, dtype=np.int64)
        np.add.at(load, self._rigid_gpu, c)  # single-unit experts
        rep_gpu = self._rep_gpu
        valid = rep_gpu < G
        nr, mu = rep_gpu.shape
        q = np.zeros((nr, mu), dtype=np.int64)
        if nr:
            crep = c[self._rep_experts]
            nunits = valid.sum(1)
            base = crep // nunits
            extra = crep - base * nunits
            col = np.arange(mu)[None, :]
            q = np.where(valid, base[:, None] + (col < extra[:, None]), 0).astype(np.int64)
            np.add.at(load, rep_gpu.ravel(), q.ravel())
            for _ in range(n_sweeps):
                moved = False
                for rows in self._colours:
                    g = rep_gpu[rows]
                    old = q[rows]
                    others = load[g] - old
                    new = _waterfill_np(crep[rows], others, valid[rows])
                    d = new - old
                    d[np.abs(d).max(1) <= 1] = 0  # +-1 moves only shuffle remainders: skip
                    new = old + d
                    load[g.ravel()] += d.ravel()  # GPUs of one colour are distinct (pad: delta 0)
                    q[rows] = new
                    moved = moved or bool(d.any())
                if not moved:  # a fixed point: further sweeps change nothing
                    break
        uq = np.concatenate((c, q.ravel()))[self._unit_src]
        per = uq // self._unit_slots
        rem = uq - per * self._unit_slots
        su = self._slot_unit
        return per[su] + (self._slot_pos < rem[su])

    def _quotas_torch(self, c: torch.Tensor, n_sweeps: int) -> torch.Tensor:
        t = self._tables(c.device)
        G = self.num_gpus
        dev = c.device
        load = torch.zeros(G + 1, dtype=torch.int64, device=dev)
        load.scatter_add_(0, t["rigid_gpu"], c)  # single-unit experts
        rep_gpu, valid = t["rep_gpu"], t["rep_valid"]
        nr, mu = rep_gpu.shape
        q = torch.zeros(nr, mu, dtype=torch.int64, device=dev)
        if nr:
            crep = c.index_select(0, t["rep_experts"])  # [nr]
            nunits = valid.sum(1)
            base = torch.div(crep, nunits, rounding_mode="floor")
            extra = crep - base * nunits
            col = torch.arange(mu, dtype=torch.int64, device=dev).view(1, mu)
            q = torch.where(
                valid,
                base.view(-1, 1) + (col < extra.view(-1, 1)).to(torch.int64),
                torch.zeros(1, dtype=torch.int64, device=dev),
            )
            load.scatter_add_(0, rep_gpu.reshape(-1), q.reshape(-1))
            on_cpu = dev.type == "cpu"
            for _ in range(n_sweeps):
                moved = False
                for rows in t["colours"]:
                    g = rep_gpu.index_select(0, rows)
                    v = valid.index_select(0, rows)
                    old = q.index_select(0, rows)
                    others = load.index_select(0, g.reshape(-1)).view(g.shape) - old
                    new = waterfill(crep.index_select(0, rows), others, v)
                    d = new - old
                    d = torch.where(d.abs().amax(1, keepdim=True) <= 1, torch.zeros_like(d), d)
                    new = old + d
                    load.scatter_add_(0, g.reshape(-1), d.reshape(-1))
                    q.index_copy_(0, rows, new)
                    if on_cpu and not moved:
                        moved = not torch.equal(new, old)
                if on_cpu and not moved:  # a fixed point: further sweeps change nothing
                    break
        uq = torch.cat((c, q.reshape(-1))).index_select(0, t["unit_src"])
        nslots = t["unit_slots"]
        per = torch.div(uq, nslots, rounding_mode="floor")
        rem = uq - per * nslots
        su = t["slot_unit"]
        return per.index_select(0, su) + (t["slot_pos"] < rem.index_select(0, su)).to(torch.int64)

    def even_quotas(self, counts: torch.Tensor) -> torch.Tensor:
        """Per-slot quotas (int64 ``[P]``) of the plan's even split of ``counts [E]``."""
        c = torch.as_tensor(counts).to(torch.int64)
        t = self._tables(c.device)
        reps, mask = t["replicas"], t["rep_mask"]
        q = self._even_table(c, mask)
        out = torch.zeros(self.num_slots, dtype=torch.int64, device=c.device)
        out.scatter_(0, reps[mask], q[mask])
        return out

    @staticmethod
    def _even_table(c: torch.Tensor, mask: torch.Tensor, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[E, max_rep]`` even split of ``c`` over the valid columns; remainders start at column
        ``shift`` (default: ``e mod cnt``, so they do not always land on the first replica)."""
        E, m = mask.shape
        cnt = mask.sum(1)
        base = torch.div(c, cnt, rounding_mode="floor")
        extra = c - base * cnt
        col = torch.arange(m, dtype=torch.int64, device=c.device).view(1, m)
        if shift is None:
            shift = torch.arange(E, dtype=torch.int64, device=c.device)
        rot = torch.remainder(col - torch.remainder(shift, cnt).view(-1, 1), cnt.view(-1, 1))
        q = base.view(-1, 1) + (rot < extra.view(-1, 1)).to(torch.int64)
        return torch.where(mask, q, torch.zeros_like(q))

    def gpu_load(self, slot_counts: torch.Tensor) -> torch.Tensor:
        """Per-GPU sums (int64 ``[num_gpus]``) of per-slot counts ``[P]``."""
        return torch.as_tensor(slot_counts).view(self.num_gpus, self.slots_per_gpu).sum(1)

    # ------------------------------------------------------------------ routing
    def route(
        self,
        topk_idx: torch.Tensor,
        global_counts: Optional[torch.Tensor] = None,
        *,
        rank: Optional[int] = None,
        group=None,
        quotas: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Physical slot of every (token, expert) pair: int64 ``[T, K]``, ``-1`` kept.

        Args:
            topk_idx: int ``[T, K]`` logical experts of this rank's tokens
                (``-1`` = none).
            global_counts: ``None`` (even split, local information only);
                ``[E]`` this step's all-reduced counts (load-aware quotas;
                each rank splits its pairs in proportion, totals match up to
                about one pair per rank); or ``[R, E]`` every rank's counts
                (load-aware quotas filled exactly by the ranks together).
            rank: this rank's row of an ``[R, E]`` ``global_counts`` (default:
                the rank in ``group`` when torch.distributed is initialised,
                else 0); with ``[E]`` it rotates the rounding remainders.
            group: the process group whose ranks the rows of ``global_counts``
                follow (as in :meth:`exchange_counts`; default: the world).
            quotas: optional ``quotas(global_counts)`` (int64 ``[P]``, any
                device) computed beforehand, e.g. on the host from counts
                copied there; skips the quota solve here.
        """
        if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2:
            raise DeepEPInputError("topk_idx must be a 2-D tensor [num_tokens, num_topk]")
        dev = topk_idx.device
        t = self._tables(dev)
        E = self.num_experts
        flat = topk_idx.reshape(-1).to(torch.int64)
        if dev.type == "cpu" and flat.numel():  # cheap here; skipped on GPU (no sync)
            lo, hi = torch.aminmax(flat)
            if int(lo) < -1 or int(hi) >= E:
                raise DeepEPInputError(f"topk_idx values must lie in [-1, {E}), got [{int(lo)}, {int(hi)}]")
        # pairs without an expert go to a dummy expert E whose only "replica" is slot -1
        e, n_all = _pair_counts(flat, E)
        n_local = n_all[:E]
        reps, mask = t["replicas"], t["rep_mask"]
        offset = torch.zeros(E + 1, dtype=torch.int64, device=dev)
        if global_counts is None:
            table = self._even_table(n_local, mask)
        else:
            gc = torch.as_tensor(global_counts).to(device=dev, dtype=torch.int64)
            if rank is None:
                rank = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
            if gc.dim() == 2 and gc.shape[1] == E:
                if not 0 <= rank < gc.shape[0]:
                    raise DeepEPInputError(f"rank {rank} outside global_counts rows [0, {gc.shape[0]})")
                offset[:E] = gc[:rank].sum(0)
                table = self._slot_table(self._given_or_solved(quotas, gc.sum(0), dev), t)
            elif gc.dim() == 1 and gc.shape[0] == E:
                table = self._proportional(
                    self._slot_table(self._given_or_solved(quotas, gc, dev), t), gc, n_local, mask, int(rank)
                )
            else:
                raise DeepEPInputError(f"global_counts must be [{E}] or [R, {E}], got {tuple(gc.shape)}")
        # position of every pair among this rank's pairs of its expert (token order), plus the
        # pairs of lower ranks
        order = torch.sort(e, stable=True).indices
        es = e.index_select(0, order)
        start = torch.cumsum(n_all, 0) - n_all
        pos = torch.arange(es.shape[0], dtype=torch.int64, device=dev) - start.index_select(0, es)
        pos = pos + offset.index_select(0, es)
        # replica j of expert e covers [cum_{j-1}, cum_j); keys e * 2^32 + cum are sorted globally;
        # the dummy row E has one column covering everything and maps to -1
        m = table.shape[1]
        cum = torch.cumsum(table, 1)
        # the last replica of every expert also takes any pair beyond the quotas (only with
        # inconsistent global_counts), so a pair can never fall into another expert's range
        last = mask.sum(1, keepdim=True) - 1
        col = torch.arange(m, dtype=torch.int64, device=dev).view(1, m)
        cum = torch.where(col >= last, torch.full_like(cum, _KEY - 1), cum)
        dummy = torch.full((1, m), _KEY - 1, dtype=torch.int64, device=dev)
        cum = torch.cat((cum, dummy), 0)
        ekey = torch.arange(E + 1, dtype=torch.int64, device=dev).view(-1, 1) * _KEY
        keys = (ekey + cum).reshape(-1)
        hit = torch.searchsorted(keys, es * _KEY + pos, right=True).clamp_(max=keys.numel() - 1)
        reps_ext = torch.cat((reps, torch.full((1, m), -1, dtype=torch.int64, device=dev)), 0)
        slot = reps_ext.reshape(-1).index_select(0, hit)
        out = torch.empty_like(flat)
        out.scatter_(0, order, slot)
        return out.view(topk_idx.shape)

    def _given_or_solved(self, quotas: Optional[torch.Tensor], counts: torch.Tensor, dev) -> torch.Tensor:
        if quotas is None:
            return self.quotas(counts)
        q = torch.as_tensor(quotas).to(device=dev, dtype=torch.int64)
        if q.shape != (self.num_slots,):
            raise DeepEPInputError(f"quotas must be [{self.num_slots}], got {tuple(q.shape)}")
        return q

    @staticmethod
    def _slot_table(q: torch.Tensor, t: Dict[str, object]) -> torch.Tensor:
        """Per-slot quotas ``[P]`` -> ``[E, max_replicas]`` table in the order of ``replicas``."""
        reps, mask = t["replicas"], t["rep_mask"]
        qt = q.index_select(0, reps.clamp(min=0).reshape(-1)).view(reps.shape)
        return torch.where(mask, qt, torch.zeros_like(qt))

    def _proportional(
        self, qt: torch.Tensor, total: torch.Tensor, local: torch.Tensor, mask: torch.Tensor, rank: int
    ) -> torch.Tensor:
        """This rank's share of the quota table ``qt [E, m]``: ``local * qt / total``, rounded so that
        rows sum to ``local`` (largest remainder, ties rotated by ``rank``)."""
        E, m = qt.shape
        tot = total.clamp(min=1).view(-1, 1)
        num = local.view(-1, 1) * qt
        base = torch.div(num, tot, rounding_mode="floor")
        frac = num - base * tot  # remainder numerators
        short = local - base.sum(1)  # units still to place
        col = torch.arange(m, dtype=torch.int64, device=qt.device).view(1, m)
        rot = torch.remainder(col - rank, m)
        # rank by (remainder desc, rotated column asc); invalid columns last
        keyv = torch.where(mask, frac * (m + 1) + (m - rot), torch.full_like(frac, -1))
        order = torch.argsort(keyv, dim=1, descending=True, stable=True)
        give = torch.zeros_like(base)
        give.scatter_(1, order, (col < short.view(-1, 1)).to(torch.int64).expand(E, m).contiguous())
        return base + torch.where(mask, give, torch.zeros_like(give))

    # ------------------------------------------------------------------ collectives
    def exchange_counts(self, topk_idx: torch.Tensor, group=None) -> torch.Tensor:
        """All-gather this rank's per-expert counts: int64 ``[R, E]`` (the ``global_counts`` of
        :meth:`route` that lets ranks fill the quotas exactly). Collective over ``group``."""
        local = local_counts(topk_idx, self.num_experts)
        world = dist.get_world_size(group)
        out = torch.empty(world, self.num_experts, dtype=torch.int64, device=local.device)
        dist.all_gather(list(out.unbind(0)), local, group=group)
        return out
