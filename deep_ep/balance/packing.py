"""Balanced packing of weighted items into packs of equal size: the planner's bin-packing core.

Items (replicas of experts) carry a weight (their expected load) and a key
(their logical expert). Packs (GPUs) take exactly ``per_pack`` items each. The
routines here balance the pack sums while keeping items of one key on
distinct packs whenever another pack has room:

* :func:`_pack` -- LPT greedy with equal cardinality (heaviest item onto the
  lightest pack with room), then the two refinements below;
* :func:`_greedy_fill` -- place a given order of items into the free slots of
  partly filled packs (used for the replicated and the single-replica experts
  of :func:`~deep_ep.balance.planner.rebalance_experts` in turn), optionally
  preferring packs that link separate groups of GPUs;
* :func:`_pair_balance` -- vectorised rounds of swaps between the i-th
  heaviest and the i-th lightest pack;
* :func:`_refine` -- swap local search on the heaviest pack until no swap
  lowers it (or it is within a target).

All of it is deterministic (ties by index) and works in place on numpy
arrays: ``pack [n]`` (the pack of every item), ``loads [packs]`` and ``has
[packs, keys]`` (items of each key in each pack).
"""

from __future__ import annotations

import heapq
from typing import Optional

import numpy as np

_EPS = 1e-9


def _pop_preferred(heap: list, tests) -> tuple:
    """Pop the lightest entry ``(load, pack)`` whose pack passes ``tests[0]``; if none does, the lightest
    passing ``tests[1]``, and so on; if none passes any test, the lightest. Entries passed over go
    back on the heap."""
    popped = []
    while heap:
        popped.append(heapq.heappop(heap))
        if tests[0](popped[-1][1]):
            break
    if not popped:
        raise RuntimeError("no pack has room")  # cannot happen: items == free slots
    choice = (
        popped[-1] if tests[0](popped[-1][1]) else next((e for t in tests[1:] for e in popped if t(e[1])), popped[0])
    )
    for entry in popped:
        if entry is not choice:
            heapq.heappush(heap, entry)
    return choice


def _tally(item_w: np.ndarray, item_key: np.ndarray, pack: np.ndarray, num_packs: int, num_keys: int):
    """``(loads [packs], has [packs, keys])`` of an assignment ``pack [n]``: pack sums and key counts."""
    loads = np.zeros(num_packs, dtype=np.float64)
    np.add.at(loads, pack, item_w)
    has = np.zeros((num_packs, num_keys), dtype=np.int64)
    np.add.at(has, (pack, item_key), 1)
    return loads, has


def _pack(
    item_w: np.ndarray,
    item_key: np.ndarray,
    num_packs: int,
    per_pack: int,
    num_keys: int,
    refine: bool = True,
    max_swaps: Optional[int] = None,
) -> np.ndarray:
    """Pack items into ``num_packs`` packs of exactly ``per_pack`` items, balancing the pack sums.

    Items with the same ``item_key`` avoid sharing a pack while any other pack
    with room exists. Returns the pack of every item (int64 ``[n]``).
    """
    n = item_w.shape[0]
    assert n == num_packs * per_pack
    pack = np.full(n, -1, dtype=np.int64)
    if num_packs == 1:
        pack[:] = 0
        return pack
    # Greedy (LPT with equal cardinality): heaviest item first onto the lightest pack with room
    # that does not hold the same key yet.
    order = np.lexsort((np.arange(n), -item_w)).tolist()  # heaviest first, ties by index
    _greedy_fill(
        item_w, item_key, order, [per_pack] * num_packs, [0.0] * num_packs, [set() for _ in range(num_packs)], pack
    )
    loads, has = _tally(item_w, item_key, pack, num_packs, num_keys)
    if refine:
        _pair_balance(item_w, item_key, pack, loads, has, num_packs, per_pack)
        _refine(item_w, item_key, pack, loads, has, num_packs, per_pack, max_swaps)
    return pack


def _swap(item_w, item_key, pack, loads, has, i, j, h, g, has_t=None) -> None:
    """Swap item ``i`` of pack ``h`` with item ``j`` of pack ``g`` (in place): ``pack``, ``loads``,
    ``has [packs, keys]`` and, if given, its transpose ``has_t``. Also vectorised: arrays ``i, j, h, g``
    of several swaps whose packs are all distinct."""
    d = item_w[i] - item_w[j]
    loads[h] -= d
    loads[g] += d
    ki, kj = item_key[i], item_key[j]
    for table in (has,) if has_t is None else (has, has_t.T):
        table[h, ki] -= 1
        table[h, kj] += 1
        table[g, kj] -= 1
        table[g, ki] += 1
    pack[i], pack[j] = g, h


def _pair_balance(item_w, item_key, pack, loads, has, num_packs, per_pack, rounds: int = 8) -> None:
    """Rounds of simultaneous swaps between the i-th heaviest and the i-th lightest pack (in place).

    Each pair takes its best single swap (the rule of :func:`_refine`); the
    pairs are disjoint, so one vectorised round improves many packs at once.
    """
    if num_packs < 2:
        return
    k = num_packs // 2
    members = np.argsort(pack, kind="stable").reshape(num_packs, per_pack)
    tol = 1e-9 * max(float(loads.max()), _EPS)
    replicated = np.bincount(item_key, minlength=has.shape[1]) > 1
    rows = np.arange(k)
    for _ in range(rounds):
        order = np.argsort(loads, kind="stable")
        heavy, light = order[::-1][:k], order[:k]
        a_items, b_items = members[heavy], members[light]  # [k, s]
        wa, wb = item_w[a_items], item_w[b_items]
        delta = wa[:, :, None] - wb[:, None, :]  # [k, s, s]
        gap = (loads[heavy] - loads[light])[:, None, None]
        score = np.minimum(delta, gap - delta)
        ka, kb = item_key[a_items], item_key[b_items]
        if replicated.any():
            bad_b = (has[heavy[:, None], kb] > 0) & replicated[kb]  # b's key already on heavy
            bad_a = (has[light[:, None], ka] > 0) & replicated[ka]  # a's key already on light
            score = np.where(bad_a[:, :, None] | bad_b[:, None, :], -np.inf, score)
        flat = score.reshape(k, -1).argmax(1)
        best = score.reshape(k, -1)[rows, flat]
        go = best > tol
        if not go.any():
            break
        ia, ib = np.divmod(flat[go], per_pack)
        sel = rows[go]
        h, l = heavy[sel], light[sel]
        i, j = a_items[sel, ia], b_items[sel, ib]
        _swap(item_w, item_key, pack, loads, has, i, j, h, l)  # packs are distinct within a round
        members[h, ia], members[l, ib] = j, i


def _refine(item_w, item_key, pack, loads, has, num_packs, per_pack, max_swaps=None, stop_at: float = -np.inf) -> None:
    """Swap local search on the heaviest pack (in place): stop when no swap lowers it.

    Swapping item ``i`` of the heaviest pack ``h`` with item ``j`` of pack ``g``
    moves ``d = w_i - w_j`` from ``h`` to ``g``; both packs end below ``L_h``
    iff ``0 < d < L_h - L_g``, and the larger of the two is smallest when
    ``min(d, L_h - L_g - d)`` is largest, which is the swap taken.
    """
    n = item_w.shape[0]
    if max_swaps is None:
        max_swaps = 4 * n
    members = np.argsort(pack, kind="stable").reshape(num_packs, per_pack)  # items of each pack
    pos = np.empty(n, dtype=np.int64)
    pos[members.ravel()] = np.arange(n)
    tol = 1e-9 * max(float(loads.max()), _EPS)
    replicated = np.bincount(item_key, minlength=has.shape[1])[item_key] > 1  # [n]
    has_t = has.T.copy()  # [keys, packs]
    any_rep = bool(replicated.any())
    near = min(num_packs - 1, 8)
    full = near == num_packs - 1
    for _ in range(max_swaps):
        h = int(np.argmax(loads))
        if loads[h] <= stop_at:
            break
        mine = members[h]  # [s]
        # First look at the lightest few packs only (cheap); fall back to all packs.
        for wide in (False, True) if not full else (True,):
            if wide:
                cand = np.arange(n)
            else:
                light = np.argpartition(loads, near)[:near]
                cand = members[light].ravel()
            cpack = pack[cand]
            gap = loads[h] - loads[cpack]  # [c], 0 on h itself
            delta = item_w[mine][:, None] - item_w[cand][None, :]  # [s, c]
            score = np.minimum(delta, gap[None, :] - delta)
            if any_rep:
                # j's key must not be on h; i's key must not be on j's pack (replicated keys only)
                ckey = item_key[cand]
                score[:, has[h, ckey] > 0] = -np.inf
                rep_rows = np.nonzero(replicated[mine])[0]
                if rep_rows.size:
                    clash = has_t[item_key[mine[rep_rows]]][:, cpack] > 0  # [r, c]
                    sub = score[rep_rows]
                    sub[clash] = -np.inf
                    score[rep_rows] = sub
            flat = int(np.argmax(score))
            if score.flat[flat] > tol:
                break
        else:
            break
        a, jc = divmod(flat, cand.shape[0])
        j = int(cand[jc])
        i = int(mine[a])
        g = int(pack[j])
        _swap(item_w, item_key, pack, loads, has, i, j, h, g, has_t)
        pi, pj = pos[i], pos[j]
        members.flat[pi], members.flat[pj] = j, i
        pos[i], pos[j] = pj, pi


def _greedy_fill(item_w, item_key, order, cap, loads, keys_in, pack, bridge=None) -> None:
    """Place ``order``'s items in turn on the lightest pack with room (``cap``) that does not hold
    the key yet (in place; ``loads`` / ``keys_in`` / ``cap`` updated).

    With ``bridge`` (int64 ``[packs]`` component labels, updated in place), a
    pack outside the components that already hold the item's key is preferred
    over a lighter one inside them, and placing the item joins the components:
    replicas of one expert then link separate groups of GPUs, so the router
    can move load between them.
    """
    num_packs = len(cap)
    wl = item_w.tolist()
    kl = item_key.tolist()
    if bridge is not None:
        comp = [int(x) for x in bridge]  # component label of every pack
        members: dict = {}
        for g, c in enumerate(comp):
            members.setdefault(c, []).append(g)
        hosts_of: dict = {}
        for g in range(num_packs):
            for k in keys_in[g]:
                hosts_of.setdefault(k, []).append(g)
    # A heap of (load, pack) over the packs with room keeps this O(n log packs).
    heap = [(float(loads[g]), g) for g in range(num_packs) if cap[g] > 0]
    heapq.heapify(heap)
    for it in order:
        k = kl[it]

        def free(g, k=k):
            return k not in keys_in[g]

        if bridge is None:
            load, g = _pop_preferred(heap, (free,))
        else:
            hosts = hosts_of.setdefault(k, [])
            linked = {comp[h] for h in hosts}
            load, g = _pop_preferred(heap, (lambda g: free(g) and comp[g] not in linked, free))
            if hosts and comp[hosts[0]] != comp[g]:  # join the two components
                a, b = comp[hosts[0]], comp[g]
                for x in members.pop(b):
                    comp[x] = a
                    members[a].append(x)
            hosts.append(g)
        pack[it] = g
        cap[g] -= 1
        keys_in[g].add(k)
        loads[g] = load + wl[it]
        if cap[g] > 0:
            heapq.heappush(heap, (loads[g], g))
    if bridge is not None:
        bridge[:] = comp
