"""Bounded host waits with a diagnosis that names the ranks that did not arrive (used by the transports,
the Buffer, load balancing and weight migration)."""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional

import torch.distributed as dist

from .errors import DeepEPError, DeepEPTimeoutError, PeerFailureError
from .streams import ints_to_device

__all__ = ["Waiter"]

log = logging.getLogger("deep_ep")


class Waiter:
    """Bounded waits with a diagnosis that names the ranks that did not arrive.

    Nothing is written on the fast path. When a wait expires, this rank
    publishes "gave up at call #n, stage s" in the group's store, gives the
    others a short grace to do the same, and raises
    :class:`~deep_ep.errors.DeepEPTimeoutError` naming the ranks that never
    reported: they did not reach this call. The grace is part of ``timeout_s``
    (the wait itself ends ``grace`` seconds earlier), so the error comes at
    ``timeout_s`` after the wait began. When the process group itself fails
    under a wait (a peer exited: gloo's "connection reset"), the same diagnosis
    names the ranks that did not answer and :class:`~deep_ep.errors.PeerFailureError`
    is raised. Afterwards the owner is broken.
    """

    def __init__(self, group: dist.ProcessGroup, key_prefix: str, timeout_s: float) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.global_ranks = [
            dist.get_global_rank(group, r) if group is not dist.group.WORLD else r for r in range(self.num_ranks)
        ]
        self.prefix = key_prefix
        self.timeout_s = timeout_s
        self.seq = 0
        self.broken: Optional[str] = None

    def _store(self):
        try:
            from torch.distributed.distributed_c10d import _get_default_store

            return _get_default_store()
        except Exception:  # pragma: no cover - store not reachable
            return None

    @property
    def grace_s(self) -> float:
        """Seconds the diagnosis after an expired wait may take (part of ``timeout_s``)."""
        return min(2.0, 0.25 * self.timeout_s)

    def wait(self, work: Any, stage: str) -> None:
        """Wait for a ``torch.distributed`` work object, at most ``timeout_s`` seconds.

        Raises:
            DeepEPTimeoutError: it did not complete (the ranks that did not arrive are named).
            PeerFailureError: the process group failed under it (a peer exited).
        """
        start = time.monotonic()
        deadline = start + self.timeout_s - self.grace_s
        spin_until = start + 2e-3  # spin (yielding) first: metadata waits are usually microseconds
        try:
            while not work.is_completed():
                now = time.monotonic()
                if now > deadline:
                    self.fail(stage, now - start)
                time.sleep(0 if now < spin_until else 5e-5)
            work.wait()
        except DeepEPError:
            raise
        except Exception as exc:  # the backend's own failure: a peer exited, a connection broke
            self.peer_failed(stage, exc)

    def _diagnose(self, kind: str, msg_stage: str) -> Dict[int, str]:
        """Publish ``kind`` at this call in the store and collect the ranks that do the same within the
        grace: ``{rank: what it reported}`` (this rank included)."""
        store = self._store()
        arrived: Dict[int, str] = {self.rank: msg_stage}
        if store is not None:
            try:
                store.set(f"{self.prefix}/{kind}/{self.rank}", msg_stage)
                grace_end = time.monotonic() + self.grace_s
                while time.monotonic() < grace_end and len(arrived) < self.num_ranks:
                    for r in range(self.num_ranks):
                        if r not in arrived:
                            key = f"{self.prefix}/{kind}/{r}"
                            if store.check([key]):
                                arrived[r] = store.get(key).decode()
                    time.sleep(0.02)
            except Exception as e:  # the store may have died with its host rank: best effort
                log.debug("deep_ep %s diagnosis failed: %s", kind, e)
                arrived = {self.rank: msg_stage}
                self._store_lost = True
        return arrived

    def peer_failed(self, stage: str, exc: BaseException) -> None:
        """The process group failed under ``stage``: name the ranks that do not answer and raise
        :class:`~deep_ep.errors.PeerFailureError` (the owner is broken afterwards)."""
        msg_stage = f"call #{self.seq} ({stage})"
        self._store_lost = False
        arrived = self._diagnose("failed", msg_stage)
        missing = [r for r in range(self.num_ranks) if r not in arrived]
        self.broken = f"failed in {msg_stage} ({type(exc).__name__})"
        if self._store_lost:
            who = "the group's store is unreachable too (rank 0 of the job, which hosts it, may be the one that exited)"
        elif missing:
            who = f"rank(s) {', '.join(str(r) for r in missing)} did not answer (they likely exited)"
        else:
            who = "every rank answered; the failure is in the backend itself"
        raise PeerFailureError(
            f"deep_ep: rank {self.rank}: the process group failed in {msg_stage}: {who}. Backend error: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. The Buffer is unusable now; "
            f"so, usually, is the process group."
        ) from exc

    def fail(self, stage: str, waited: float) -> None:
        """Publish this rank's timeout, diagnose who is missing and raise."""
        msg_stage = f"call #{self.seq} ({stage})"
        self._store_lost = False
        arrived = self._diagnose("timeout", msg_stage)
        missing = [r for r in range(self.num_ranks) if r not in arrived]
        waited += self.grace_s if missing else 0.0
        self.broken = f"timed out in {msg_stage}"
        if missing:
            who = ", ".join(str(r) for r in missing)
            detail = (
                f"rank(s) {who} of the group (global rank(s) "
                f"{', '.join(str(self.global_ranks[r]) for r in missing)}) did not arrive"
            )
        else:
            detail = "every rank reported waiting: " + "; ".join(
                f"rank {r} gave up at {arrived[r]}" for r in sorted(arrived)
            )
        raise DeepEPTimeoutError(
            f"deep_ep: rank {self.rank} waited {waited:.1f}s (timeout_s={self.timeout_s:g}) in {msg_stage}; "
            f"{detail}. The Buffer is unusable now; the process group may be too."
        )


_verdict_calls: Dict[str, int] = {}


def agree_verdicts(group: Any, problem: Optional[BaseException], what: str, timeout_s: float, values=()) -> list:
    """Every rank's verdict on its own arguments of a collective call ``what``, exchanged over ``group``
    within ``timeout_s``, before any other collective of that call: raise on every rank alike.

    The rank whose ``problem`` is set raises it (its message starting with its rank); the others raise
    :class:`~deep_ep.errors.RemoteInputError` naming it. ``values`` (ints) travel too and must be the same
    on every rank (else :class:`~deep_ep.errors.RankMismatchError`).

    Args:
        group: a process group (``None``: the default group).
        problem: this rank's argument error, or ``None``.
        what: the call's name (in messages and timeouts).
        timeout_s: the bound of the wait.
        values: ints every rank must agree on.

    Returns:
        ``[R, 1 + len(values)]`` rows as Python lists (when nothing was raised).
    """
    import torch

    from .errors import RankMismatchError, RemoteInputError

    group = group if group is not None else dist.group.WORLD
    R, rank = dist.get_world_size(group), dist.get_rank(group)
    be = str(dist.get_backend(group)).lower()
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in be else torch.device("cpu")
    mine = ints_to_device([int(problem is not None)] + [int(v) for v in values], torch.int64, device)
    out = torch.empty((R * mine.numel(),), dtype=torch.int64, device=device)
    n = _verdict_calls[what] = _verdict_calls.get(what, 0) + 1
    waiter = Waiter(group, f"deep_ep/verdict/{what}/{n}", timeout_s)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    waiter.wait(gather(out, mine, group=group, async_op=True), f"{what} arguments")
    rows = out.view(R, -1).cpu().tolist()
    bad = [r for r, row in enumerate(rows) if row[0]]
    if bad:
        if problem is not None:
            if problem.args and isinstance(problem.args[0], str) and not problem.args[0].startswith("rank "):
                problem.args = (f"rank {rank}: {problem.args[0]}",) + tuple(problem.args[1:])
            raise problem
        raise RemoteInputError(f"{what}: rank(s) {bad} rejected their arguments; see their errors")
    for col in range(1, len(values) + 1):
        vals = [row[col] for row in rows]
        if len(set(vals)) > 1:
            raise RankMismatchError(
                f"{what}: ranks disagree ({', '.join(f'rank {r}: {v}' for r, v in enumerate(vals))})"
            )
    return rows
