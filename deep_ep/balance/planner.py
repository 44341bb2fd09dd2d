"""Expert placement: how many replicas each expert gets and which GPU holds each one.

The planner turns a per-expert load estimate ``weight [layers, E]`` into a
physical layout of ``num_replicas`` expert slots, ``num_replicas // num_gpus``
slots per GPU, in the same three tensors as DeepSeek's EPLB so the two are
interchangeable (docs/api.md, deep_ep.balance):

* ``phy2log [layers, P]``: the logical expert held by physical slot ``p``;
  slot ``p`` lives on GPU ``p // (P // num_gpus)``;
* ``log2phy [layers, E, max_replicas]``: the slots of each expert, ascending,
  padded with ``-1``;
* ``logcnt [layers, E]``: the number of replicas of each expert.

Method, per layer (host side, numpy; a few milliseconds for 256 experts on 64
GPUs):

1. Replica counts. Every expert gets one slot; each spare slot goes to the
   expert with the largest load per replica (EPLB's rule), computed in one
   partial sort: the greedy takes the ``P - E`` largest of ``w_e / j``,
   ``j >= 1``. With ``headroom = h`` the rule runs on ``w_e + h * mean GPU
   load``: an allowance any expert may gain before the next re-plan (drift, a
   burst). It moves spare slots from the hottest experts' many replicas to
   second replicas of the next experts, whose load the router can then shift
   (``h = 0`` is EPLB's rule exactly).
2. Packing, replicated experts first. Their replicas, heaviest first, go to
   the lightest GPU that does not hold the expert yet, preferring a GPU not
   yet linked to the expert's other replicas (linked = connected through
   shared replicated experts) and at most ``ceil(F / G)`` of them per GPU.
   Every GPU thus holds load that the load-aware split of
   :class:`~deep_ep.balance.ReplicaRouter` can move, and the replicas chain
   the GPUs together so load can flow from any busy GPU to idle ones.
3. Single-replica experts then fill the remaining slots, heaviest first onto
   the lightest GPU, and swaps refine the per-GPU sums (rounds of swaps
   between the i-th heaviest and i-th lightest GPU, then swaps out of the
   heaviest GPU, never two replicas of one expert on a GPU) until the maximum
   is within 0.2% of the lower bound ``max(mean, heaviest replica)`` or no
   swap lowers it.
4. Hierarchy. When ``num_groups % num_nodes == 0`` the expert groups are
   first packed onto nodes (equal group count per node, balanced load), and
   steps 1-3 run inside each node on that node's GPUs, so the experts of one
   group stay on one node (EPLB's hierarchical policy). Otherwise the whole
   cluster is treated as one node.
5. Re-plans that move little. Given the previous ``phy2log``, the planner
   first adapts it: replicas of experts that keep their count stay where they
   are, surplus replicas leave the busiest GPUs, new replicas take the freed
   slots (step 2's rule), and swaps lower the busiest GPU until it is within
   ``1 + move_slack`` of the lower bound. It keeps that plan when its maximum
   is within ``1 + move_slack`` of a fresh plan's; otherwise the fresh plan's
   GPUs are matched to the old ones by overlap. Experts that stay on a GPU
   keep their slot. :func:`moved_experts` counts the weight copies.

Everything is deterministic: the same inputs give the same plan on every rank.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import numpy as np
import torch

from ..errors import DeepEPInputError
from .packing import _EPS, _greedy_fill, _pack, _pair_balance, _refine, _tally
from .placement import gpu_expert_counts, gpu_loads, host_int64, moved_experts, replica_table

__all__ = ["rebalance_experts", "replica_counts", "moved_experts", "gpu_loads"]

log = logging.getLogger("deep_ep.balance")


def replica_counts(load, num_slots: int) -> np.ndarray:
    """Replicas per expert: one each, then every spare slot to the largest load per replica.

    ``load``: float ``[E]`` (array-like); ``num_slots >= E``. Returns int64 ``[E]``
    summing to ``num_slots``. Ties go to the lower expert id (deterministic).
    """
    w = np.asarray(load, dtype=np.float64).reshape(-1)
    n = w.shape[0]
    spare = int(num_slots) - n
    if spare < 0:
        raise DeepEPInputError(f"num_slots={num_slots} is smaller than the number of experts {n}")
    cnt = np.ones(n, dtype=np.int64)
    if spare == 0:
        return cnt
    # Adding a replica to an expert that has j of them is worth w_e / j (its current load per
    # replica); those values fall with j, so the sequential greedy takes the `spare` largest of
    # {w_e / j : j = 1 .. spare}, ties to the lower expert id.
    w = np.maximum(w, 0.0)
    js = np.arange(1, spare + 1, dtype=np.float64)
    vals = (w[:, None] / js[None, :]).ravel()  # [E * spare], row-major (e, j)
    e_idx = np.repeat(np.arange(n), spare)
    if spare < vals.size:
        thr = np.partition(vals, vals.size - spare)[vals.size - spare]  # spare-th largest value
        above = np.nonzero(vals > thr)[0]
        tied = np.nonzero(vals == thr)[0][: spare - above.size]  # (e, j) order: lower e first
        order = np.concatenate((above, tied))
    else:
        order = np.arange(vals.size)
    np.add.at(cnt, e_idx[order], 1)
    return cnt


_GOOD_ENOUGH = 2e-3  # refinement stops within this fraction of the lower bound of the maximum


def _replica_weight(w: np.ndarray, num_gpus: int, headroom: float) -> np.ndarray:
    """Loads used to hand out spare slots: the load plus ``headroom`` x the mean per-GPU load."""
    return w + headroom * float(w.sum()) / num_gpus if headroom else w


def _plan_flat(w: np.ndarray, num_slots: int, num_gpus: int, headroom: float = 0.0) -> np.ndarray:
    """Replicate and pack one node: local expert of every slot, GPU-major (int64 ``[num_slots]``).

    Replicated experts (the load the router can shift) are spread first, so
    every GPU gets its share of them and their replicas link the GPUs;
    single-replica experts then fill the remaining slots, and swaps refine the
    per-GPU sums (module docstring, steps 1-3).
    """
    n = w.shape[0]
    per_gpu = num_slots // num_gpus
    cnt = replica_counts(_replica_weight(w, num_gpus, headroom), num_slots)
    item_key = np.repeat(np.arange(n, dtype=np.int64), cnt)
    item_w = (w / cnt)[item_key]
    if num_gpus == 1:
        pack = np.zeros(item_key.shape[0], dtype=np.int64)
    else:
        flex = cnt[item_key] > 1
        pack = np.full(item_key.shape[0], -1, dtype=np.int64)
        loads = np.zeros(num_gpus)
        keys_in = [set() for _ in range(num_gpus)]
        fi = np.nonzero(flex)[0]
        cap = [min(-(-fi.size // num_gpus), per_gpu)] * num_gpus
        _greedy_fill(
            item_w,
            item_key,
            fi[np.lexsort((fi, item_key[fi], -item_w[fi]))].tolist(),
            cap,
            loads,
            keys_in,
            pack,
            bridge=np.arange(num_gpus),
        )
        cap = [per_gpu - len(k) for k in keys_in]
        ri = np.nonzero(~flex)[0]
        _greedy_fill(item_w, item_key, ri[np.lexsort((ri, -item_w[ri]))].tolist(), cap, loads, keys_in, pack)
        loads, has = _tally(item_w, item_key, pack, num_gpus, n)
        # no plan beats max(mean load, heaviest replica); stop refining within 0.2% of it
        good_enough = max(float(item_w.sum()) / num_gpus, float(item_w.max())) * (1 + _GOOD_ENOUGH)
        if loads.max() > good_enough:
            _pair_balance(item_w, item_key, pack, loads, has, num_gpus, per_gpu)
            _refine(item_w, item_key, pack, loads, has, num_gpus, per_gpu, stop_at=good_enough)
    # GPU-major slot order; inside a GPU, heavier replicas first (ties by expert id).
    order = np.lexsort((item_key, -item_w, pack))
    return item_key[order]


def _plan_incremental(
    w: np.ndarray, prev: np.ndarray, num_gpus: int, target: float, headroom: float = 0.0
) -> np.ndarray:
    """Adapt the previous placement ``prev`` (local expert per slot) to ``w`` moving few replicas.

    Keeps every replica whose expert keeps its count (surplus replicas leave
    the busiest GPUs first), puts the new replicas on the lightest GPUs with a
    freed slot, then swaps replicas out of the heaviest GPU until its load is
    at most ``target``.
    """
    n = w.shape[0]
    num_slots = prev.shape[0]
    per_gpu = num_slots // num_gpus
    cnt = replica_counts(_replica_weight(w, num_gpus, headroom), num_slots)
    old_cnt = np.bincount(prev, minlength=n)
    slot_gpu = np.arange(num_slots) // per_gpu
    share = w / cnt
    loads = np.zeros(num_gpus)
    np.add.at(loads, slot_gpu, share[prev])
    keep = np.ones(num_slots, dtype=bool)
    for e in np.nonzero(old_cnt > cnt)[0].tolist():  # drop surplus replicas, busiest GPU first
        slots = np.nonzero(prev == e)[0]
        drop = slots[np.argsort(-loads[slot_gpu[slots]], kind="stable")[: old_cnt[e] - cnt[e]]]
        keep[drop] = False
        np.subtract.at(loads, slot_gpu[drop], share[e])
    need = np.maximum(cnt - np.minimum(old_cnt, cnt), 0)
    new_key = np.repeat(np.arange(n, dtype=np.int64), need)
    item_key = np.concatenate((prev[keep], new_key))
    item_w = share[item_key]
    pack = np.concatenate((slot_gpu[keep], np.full(new_key.shape[0], -1, dtype=np.int64)))
    keys_in = [set() for _ in range(num_gpus)]
    for e, g in zip(prev[keep].tolist(), slot_gpu[keep].tolist()):
        keys_in[g].add(e)
    cap = np.bincount(slot_gpu[~keep], minlength=num_gpus).tolist()
    loads_l = loads.tolist()
    idx_new = np.arange(keep.sum(), item_key.shape[0])
    # components of GPUs linked by the kept replicas of replicated experts
    bridge = np.arange(num_gpus)
    flex_keep = np.nonzero(cnt[prev[keep]] > 1)[0]
    first_g: dict = {}
    for e, g in zip(prev[keep][flex_keep].tolist(), slot_gpu[keep][flex_keep].tolist()):
        if e in first_g:
            a, b = bridge[first_g[e]], bridge[g]
            if a != b:
                bridge[bridge == b] = a
        else:
            first_g[e] = g
    _greedy_fill(
        item_w,
        item_key,
        idx_new[np.lexsort((idx_new, item_key[idx_new], -item_w[idx_new]))].tolist(),
        cap,
        loads_l,
        keys_in,
        pack,
        bridge=bridge,
    )
    loads, has = _tally(item_w, item_key, pack, num_gpus, n)
    _refine(item_w, item_key, pack, loads, has, num_gpus, per_gpu, stop_at=target)
    out = np.empty(num_slots, dtype=np.int64)
    order = np.lexsort((item_key, -item_w, pack))
    for g in range(num_gpus):
        mine = item_key[order[g * per_gpu : (g + 1) * per_gpu]]
        out[g * per_gpu : (g + 1) * per_gpu] = _align_slots(mine, prev[g * per_gpu : (g + 1) * per_gpu])
    return out


def _max_load(w: np.ndarray, slots: np.ndarray, num_gpus: int) -> float:
    cnt = np.bincount(slots, minlength=w.shape[0])
    return float((w[slots] / cnt[slots]).reshape(num_gpus, -1).sum(1).max())


def _match_previous(new: np.ndarray, old: np.ndarray, num_gpus: int, num_nodes: int, num_experts: int) -> np.ndarray:
    """Relabel GPUs (within nodes) and order slots so that ``new`` moves as few weights from ``old``."""
    per_gpu = new.shape[0] // num_gpus
    gpn = num_gpus // num_nodes
    new_g = new.reshape(num_gpus, per_gpu)
    old_g = old.reshape(num_gpus, per_gpu)
    cn = gpu_expert_counts(new, num_gpus, num_experts)
    co = gpu_expert_counts(old, num_gpus, num_experts)
    out = np.empty_like(new_g)
    for node in range(num_nodes):
        sl = slice(node * gpn, (node + 1) * gpn)
        overlap = np.minimum(cn[sl, None, :], co[None, sl, :]).sum(-1)  # [new, old]
        assign = _max_assignment(overlap)  # new gpu -> old gpu (local)
        for a in range(gpn):
            src = new_g[node * gpn + a]
            b = node * gpn + int(assign[a])
            out[b] = _align_slots(src, old_g[b])
    return out.reshape(-1)


def _max_assignment(overlap: np.ndarray) -> np.ndarray:
    """Permutation ``new -> old`` with a large total overlap: greedy by largest overlap (ties by index)."""
    n = overlap.shape[0]
    out = np.full(n, -1, dtype=np.int64)
    used_r = np.zeros(n, dtype=bool)
    used_c = np.zeros(n, dtype=bool)
    for flat in np.lexsort((np.arange(n * n), -overlap.ravel())).tolist():
        a, b = divmod(flat, n)
        if not used_r[a] and not used_c[b]:
            out[a] = b
            used_r[a] = used_c[b] = True
    return out


def _align_slots(new_slots: np.ndarray, old_slots: np.ndarray) -> np.ndarray:
    """Order ``new_slots`` so that experts also present in ``old_slots`` keep their position."""
    s = new_slots.shape[0]
    out = np.full(s, -1, dtype=np.int64)
    remaining = list(new_slots.tolist())
    for j in range(s):
        e = int(old_slots[j])
        if e in remaining:
            out[j] = e
            remaining.remove(e)
    free = [j for j in range(s) if out[j] < 0]
    for j, e in zip(free, remaining):
        out[j] = e
    return out


def _plan_layer(
    w: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    prev: Optional[np.ndarray] = None,
    move_slack: float = 0.0,
    headroom: float = 0.0,
) -> np.ndarray:
    """One layer's ``phy2log``. With ``prev``: reuse the previous placement where the planned
    maximum stays within ``1 + move_slack`` of a fresh plan's, else relabel the fresh plan."""
    num_experts = w.shape[0]
    slots_per_node = num_replicas // num_nodes
    gpus_per_node = num_gpus // num_nodes
    group_size = num_experts // num_groups
    # groups -> nodes
    if num_nodes == 1:
        node_of_group = np.zeros(num_groups, dtype=np.int64)
    else:
        group_w = w.reshape(num_groups, group_size).sum(1)
        node_of_group = _pack(group_w, np.arange(num_groups), num_nodes, num_groups // num_nodes, num_groups)
        if prev is not None:
            # keep the previous group -> node map if it is (nearly) as good and consistent
            prev_node = np.arange(num_replicas) // slots_per_node
            first = np.full(num_experts, -1, dtype=np.int64)
            first[prev[::-1]] = prev_node[::-1]
            old_map = first[np.arange(num_groups) * group_size]
            consistent = (first.reshape(num_groups, group_size) == old_map[:, None]).all() and (
                np.bincount(old_map, minlength=num_nodes) == num_groups // num_nodes
            ).all()
            if consistent:
                new_max = np.bincount(node_of_group, weights=group_w, minlength=num_nodes).max()
                old_max = np.bincount(old_map, weights=group_w, minlength=num_nodes).max()
                if old_max <= new_max * (1 + move_slack) + _EPS:
                    node_of_group = old_map
    out = np.empty(num_replicas, dtype=np.int64)
    for node in range(num_nodes):
        groups = np.nonzero(node_of_group == node)[0]
        experts = (groups[:, None] * group_size + np.arange(group_size)[None, :]).ravel()
        sl = slice(node * slots_per_node, (node + 1) * slots_per_node)
        wn = w[experts]
        local = None
        if prev is not None:
            lookup = np.full(num_experts, -1, dtype=np.int64)
            lookup[experts] = np.arange(experts.shape[0])
            prev_local = lookup[prev[sl]]
            if (prev_local >= 0).all():
                # target: a lower bound of any plan's maximum (mean load, heaviest replica) + slack
                cnt = replica_counts(_replica_weight(wn, gpus_per_node, headroom), slots_per_node)
                bound = max(wn.sum() / gpus_per_node, float((wn / cnt).max()) if wn.size else 0.0)
                target = bound * (1 + move_slack)
                inc = _plan_incremental(wn, prev_local, gpus_per_node, target, headroom)
                inc_max = _max_load(wn, inc, gpus_per_node)
                if inc_max <= target + _EPS * max(target, 1.0):
                    local = inc
                else:  # compare with a fresh plan before paying for its moves
                    fresh = _plan_flat(wn, slots_per_node, gpus_per_node, headroom)
                    fresh_max = _max_load(wn, fresh, gpus_per_node)
                    if inc_max <= fresh_max * (1 + move_slack) + _EPS * max(fresh_max, 1.0):
                        local = inc
                    else:
                        local = _match_previous(fresh, prev_local, gpus_per_node, 1, experts.shape[0])
            else:
                old = np.where(prev_local >= 0, prev_local, experts.shape[0])
                fresh = _plan_flat(wn, slots_per_node, gpus_per_node, headroom)
                local = _match_previous(fresh, old, gpus_per_node, 1, experts.shape[0] + 1)
        if local is None:
            local = _plan_flat(wn, slots_per_node, gpus_per_node, headroom)
        out[sl] = experts[local]
    return out


def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    prev_phy2log: Optional[torch.Tensor] = None,
    move_slack: float = 0.05,
    headroom: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replicate and place experts so that the per-GPU load of ``weight`` is even.

    Args:
        weight: float ``[layers, E]`` (or ``[E]``), the expected load of every
            logical expert (e.g. :meth:`LoadMonitor.forecast`).
        num_replicas: physical slots ``P``, a multiple of ``num_gpus``, ``>= E``.
        num_groups: expert groups (``E % num_groups == 0``); with
            ``num_groups % num_nodes == 0`` the plan is hierarchical and a
            group's experts stay on one node.
        num_nodes: nodes (``num_gpus % num_nodes == 0``).
        num_gpus: GPUs; slot ``p`` lives on GPU ``p // (P // num_gpus)``.
        prev_phy2log: optional previous ``phy2log`` of the same shape: the new
            plan adapts it and moves few expert weights (module docstring).
        move_slack: with ``prev_phy2log``, how much higher (relative) the
            planned maximum per-GPU load may be than a fresh plan's to keep
            the previous placement's experts in place.
        headroom: load allowance, in units of the mean per-GPU load, added to
            every expert when spare slots are handed out (0 = EPLB's rule;
            about 0.5 pays off with the load-aware split of
            :class:`~deep_ep.balance.ReplicaRouter` under drift and bursts).

    Returns:
        ``(phy2log int64 [layers, P], log2phy int64 [layers, E, max_replicas]
        padded with -1, logcnt int64 [layers, E])`` on ``weight``'s device, the
        shapes of DeepSeek's EPLB.
    """
    if not isinstance(weight, torch.Tensor):
        weight = torch.as_tensor(weight, dtype=torch.float64)
    if weight.dim() == 1:
        weight = weight.unsqueeze(0)
    if weight.dim() != 2:
        raise DeepEPInputError(f"weight must be [layers, num_experts], got shape {tuple(weight.shape)}")
    num_layers, num_experts = weight.shape
    for name, v in (
        ("num_replicas", num_replicas),
        ("num_groups", num_groups),
        ("num_nodes", num_nodes),
        ("num_gpus", num_gpus),
    ):
        if not isinstance(v, int) or v <= 0:
            raise DeepEPInputError(f"{name} must be a positive int, got {v!r}")
    if num_replicas % num_gpus:
        raise DeepEPInputError(f"num_replicas={num_replicas} must be a multiple of num_gpus={num_gpus}")
    if num_replicas < num_experts:
        raise DeepEPInputError(f"num_replicas={num_replicas} < num_experts={num_experts}: every expert needs a slot")
    if num_gpus % num_nodes:
        raise DeepEPInputError(f"num_gpus={num_gpus} must be a multiple of num_nodes={num_nodes}")
    if num_experts % num_groups:
        raise DeepEPInputError(f"num_experts={num_experts} must be a multiple of num_groups={num_groups}")
    if not (headroom >= 0 and move_slack >= 0):
        raise DeepEPInputError(f"headroom and move_slack must be >= 0, got {headroom!r}, {move_slack!r}")
    hierarchical = num_groups % num_nodes == 0
    if not hierarchical:
        num_groups, num_nodes = 1, 1
    w_all = weight.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(w_all).all() or (w_all < 0).any():
        raise DeepEPInputError("weight must be finite and non-negative")
    prev = None
    if prev_phy2log is not None:
        prev = host_int64(prev_phy2log)
        prev = prev.reshape(-1, prev.shape[-1])
        if prev.shape != (num_layers, num_replicas):
            log.warning("prev_phy2log has shape %s, expected %s; ignored", prev.shape, (num_layers, num_replicas))
            prev = None
    phy2log = np.empty((num_layers, num_replicas), dtype=np.int64)
    for layer in range(num_layers):
        phy2log[layer] = _plan_layer(
            w_all[layer],
            num_replicas,
            num_groups,
            num_nodes,
            num_gpus,
            None if prev is None else prev[layer],
            move_slack,
            headroom,
        )
    logcnt = np.stack([np.bincount(row, minlength=num_experts) for row in phy2log])
    max_rep = int(logcnt.max())
    log2phy = np.stack([replica_table(row, cnt, max_rep) for row, cnt in zip(phy2log, logcnt)])
    dev = weight.device
    return (
        torch.as_tensor(phy2log, dtype=torch.int64).to(dev),
        torch.as_tensor(log2phy, dtype=torch.int64).to(dev),
        torch.as_tensor(logcnt, dtype=torch.int64).to(dev),
    )
