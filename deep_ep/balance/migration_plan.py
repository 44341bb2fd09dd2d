"""The migration plan: which expert copies cross ranks when the placement changes.

A pure function of the two placements (no communication), identical on every
rank: :func:`plan_migration` builds a :class:`MigrationPlan`,
:func:`placement_moves` counts its cross-rank copies. The transfer itself is
:func:`~deep_ep.balance.migrate.migrate_experts` (module
:mod:`deep_ep.balance.migrate`, which re-exports these names).

Rules: a new slot whose logical expert its rank already holds (in any old
slot) is filled by a local copy; otherwise one copy crosses ranks per
(destination rank, expert), from the old holder asked to send the fewest
copies so far (ties to the lowest old slot). Slot ``p`` of a placement of
``P`` slots lives on rank ``p // (P // num_ranks)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from ..errors import DeepEPInputError, DeepEPTypeError

__all__ = ["MigrationPlan", "plan_migration", "placement_moves"]


@dataclass(frozen=True)
class MigrationPlan:
    """How a placement change is carried out; identical on every rank (a pure function of the placements).

    Attributes (all int64 numpy arrays, slots are *local* slot indices):

    * ``transfers [n, 5]``: ``(layer, src_rank, src_slot, dst_rank, expert)``,
      one row per expert copy that crosses ranks, in wire order;
    * ``targets [m, 2]``: ``(transfer, dst_slot)``: the new slots each
      transfer fills (one transfer may fill several replicas on its rank);
    * ``local [c, 4]``: ``(layer, rank, src_slot, dst_slot)``: new slots
      filled from a copy the rank already holds.

    Every new slot of every rank appears exactly once in ``targets`` or
    ``local``.
    """

    num_ranks: int
    num_layers: int
    old_slots_per_rank: int
    new_slots_per_rank: int
    layered: bool
    transfers: np.ndarray
    targets: np.ndarray
    local: np.ndarray

    @property
    def num_moves(self) -> int:
        """Expert copies that cross ranks (rows of all the all-to-alls, per tensor)."""
        return int(self.transfers.shape[0])

    def send_counts(self) -> np.ndarray:
        """``[R, R]`` int64: expert copies sent from rank ``i`` to rank ``j``."""
        m = np.zeros((self.num_ranks, self.num_ranks), dtype=np.int64)
        np.add.at(m, (self.transfers[:, 1], self.transfers[:, 3]), 1)
        return m

    def for_rank(self, rank: int) -> Dict[str, Any]:
        """This rank's index lists (flat ``layer * S + slot`` row indices) and all-to-all split sizes."""
        t = self.transfers
        s_old, s_new, R = self.old_slots_per_rank, self.new_slots_per_rank, self.num_ranks
        send_ids = np.nonzero(t[:, 1] == rank)[0]
        send_ids = send_ids[np.argsort(t[send_ids, 3], kind="stable")]
        recv_ids = np.nonzero(t[:, 3] == rank)[0]
        recv_ids = recv_ids[np.argsort(t[recv_ids, 1], kind="stable")]
        row_of = np.full(t.shape[0], -1, dtype=np.int64)
        row_of[recv_ids] = np.arange(recv_ids.size, dtype=np.int64)
        tg = self.targets[t[self.targets[:, 0], 3] == rank] if self.targets.size else self.targets
        loc = self.local[self.local[:, 1] == rank]
        return {
            "send_src": t[send_ids, 0] * s_old + t[send_ids, 2],
            "in_splits": np.bincount(t[send_ids, 3], minlength=R).tolist(),
            "out_splits": np.bincount(t[recv_ids, 1], minlength=R).tolist(),
            "num_recv": int(recv_ids.size),
            "recv_dst": t[tg[:, 0], 0] * s_new + tg[:, 1] if tg.size else np.zeros(0, dtype=np.int64),
            "recv_row": row_of[tg[:, 0]] if tg.size else np.zeros(0, dtype=np.int64),
            "local_dst": loc[:, 0] * s_new + loc[:, 3],
            "local_src": loc[:, 0] * s_old + loc[:, 2],
        }

    def max_rows_per_rank(self) -> int:
        """Largest number of rows any rank sends or receives (sizes the buckets identically everywhere)."""
        if not self.num_moves:
            return 0
        m = self.send_counts()
        return int(max(m.sum(axis=0).max(), m.sum(axis=1).max()))


def _as_placement(x: Any, what: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "iu":
            raise DeepEPTypeError(f"{what} must hold integers (logical expert ids), got numpy dtype {x.dtype}")
        a = x.astype(np.int64)
    elif isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise DeepEPTypeError(f"{what} must be an integer tensor (logical expert ids), got {x.dtype}")
        a = x.detach().to("cpu", torch.int64).numpy()
    elif isinstance(x, (list, tuple)):
        try:
            a = np.asarray(x)
        except Exception as e:  # ragged lists
            raise DeepEPInputError(f"{what}: cannot make an array of it ({e})") from None
        if a.size and a.dtype.kind not in "iu":
            raise DeepEPTypeError(f"{what} must hold integers (logical expert ids), got {a.dtype}")
        a = a.astype(np.int64)
    else:
        raise DeepEPTypeError(f"{what} must be a tensor of logical expert ids, got {type(x).__name__}")
    if a.ndim not in (1, 2):
        raise DeepEPInputError(f"{what} must be [num_replicas] or [layers, num_replicas], got shape {tuple(a.shape)}")
    if a.shape[-1] == 0 or a.shape[0] == 0:
        raise DeepEPInputError(f"{what} is empty (shape {tuple(a.shape)})")
    if a.min() < 0:
        raise DeepEPInputError(
            f"{what} holds a negative expert id ({int(a.min())}); every physical slot must hold a logical expert"
        )
    return a


def _normalise(old_phy2log: Any, new_phy2log: Any, num_ranks: int) -> Tuple[np.ndarray, np.ndarray, bool]:
    if not isinstance(num_ranks, int) or isinstance(num_ranks, bool) or num_ranks < 1:
        raise DeepEPInputError(f"num_ranks must be a positive int, got {num_ranks!r}")
    old = _as_placement(old_phy2log, "old_phy2log")
    new = _as_placement(new_phy2log, "new_phy2log")
    if old.ndim != new.ndim:
        raise DeepEPInputError(
            f"old_phy2log {tuple(old.shape)} and new_phy2log {tuple(new.shape)} must both be 1-D "
            f"or both [layers, num_replicas]"
        )
    if old.ndim == 2 and old.shape[0] != new.shape[0]:
        raise DeepEPInputError(f"old_phy2log has {old.shape[0]} layers, new_phy2log {new.shape[0]}")
    for a, what in ((old, "old_phy2log"), (new, "new_phy2log")):
        if a.shape[-1] % num_ranks:
            raise DeepEPInputError(
                f"{what} has {a.shape[-1]} physical slots, not a multiple of the {num_ranks} "
                f"ranks (each rank holds num_replicas // num_ranks consecutive slots)"
            )
    layered = old.ndim == 2
    return old.reshape(-1, old.shape[-1]), new.reshape(-1, new.shape[-1]), layered


def plan_migration(old_phy2log: Any, new_phy2log: Any, num_ranks: int) -> MigrationPlan:
    """The :class:`MigrationPlan` that turns placement ``old_phy2log`` into ``new_phy2log`` on ``num_ranks`` ranks.

    Both placements are int ``[P]`` or ``[layers, P]`` (DeepSeek EPLB's
    ``phy2log``; slot ``p`` on rank ``p // (P // num_ranks)``); ``P`` may
    differ between them. Deterministic and free of communication: every rank
    computes the same plan. Raises :class:`~deep_ep.errors.DeepEPInputError`
    if the shapes do not fit or a logical expert of the new placement has no
    copy in the old one (of the same layer).
    """
    old, new, layered = _normalise(old_phy2log, new_phy2log, num_ranks)
    R = num_ranks
    s_old, s_new = old.shape[1] // R, new.shape[1] // R
    transfers: List[Tuple[int, int, int, int, int]] = []
    targets: List[Tuple[int, int]] = []
    local: List[Tuple[int, int, int, int]] = []
    sent = [0] * R
    for layer in range(old.shape[0]):
        holders: Dict[int, List[int]] = {}
        for p, e in enumerate(old[layer].tolist()):
            holders.setdefault(e, []).append(p)  # ascending old slots
        missing = sorted(set(new[layer].tolist()) - set(holders))
        if missing:
            where = f" of layer {layer}" if layered else ""
            raise DeepEPInputError(
                f"new_phy2log{where} places logical expert(s) {missing[:8]}{'...' if len(missing) > 8 else ''} that "
                f"no slot of old_phy2log{where} holds: their weights exist nowhere to migrate from"
            )
        row = new[layer].tolist()
        for d in range(R):
            lo = d * s_old
            held = {}
            for i, e in enumerate(old[layer, lo : lo + s_old].tolist()):
                held.setdefault(e, i)  # lowest local slot holding e
            pending: Dict[int, int] = {}
            for j in range(s_new):
                e = row[d * s_new + j]
                if e in held:
                    local.append((layer, d, held[e], j))
                elif e in pending:
                    targets.append((pending[e], j))
                else:
                    src = min(holders[e], key=lambda p: (sent[p // s_old], p))
                    src_rank = src // s_old
                    sent[src_rank] += 1
                    pending[e] = len(transfers)
                    targets.append((len(transfers), j))
                    transfers.append((layer, src_rank, src - src_rank * s_old, d, e))

    def arr(rows, width):
        return np.asarray(rows, dtype=np.int64).reshape(-1, width)

    return MigrationPlan(R, old.shape[0], s_old, s_new, layered, arr(transfers, 5), arr(targets, 2), arr(local, 4))


def placement_moves(old_phy2log: Any, new_phy2log: Any, num_ranks: int) -> int:
    """Expert copies that must cross ranks to go from ``old_phy2log`` to ``new_phy2log`` (summed over layers).

    This is exactly the number of rows :func:`migrate_experts` sends per
    tensor: a new slot costs nothing if its rank already holds the expert (in
    any old slot), and a rank that needs several new replicas of an expert it
    did not hold receives one copy. Hence it is at most
    :func:`~deep_ep.balance.moved_experts` (which counts replicas), and equal
    to it when no rank gains two replicas of one expert it did not hold.
    """
    return plan_migration(old_phy2log, new_phy2log, num_ranks).num_moves
