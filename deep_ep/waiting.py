"""Bounded host waits with a diagnosis that names the ranks that did not arrive (used by the transports,
the Buffer, load balancing and weight migration)."""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional

import torch.distributed as dist

from .errors import DeepEPTimeoutError

__all__ = ["Waiter"]

log = logging.getLogger("deep_ep")


class Waiter:
    """Bounded waits with a diagnosis that names the ranks that did not arrive.

    Nothing is written on the fast path. When a wait expires, this rank
    publishes "gave up at call #n, stage s" in the group's store, gives the
    others a short grace to do the same, and raises
    :class:`~deep_ep.errors.DeepEPTimeoutError` naming the ranks that never
    reported: they did not reach this call. Afterwards the owner is broken.
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

    def wait(self, work: Any, stage: str) -> None:
        """Wait for a ``torch.distributed`` work object, at most ``timeout_s`` seconds."""
        start = time.monotonic()
        deadline = start + self.timeout_s
        spin_until = start + 2e-3  # spin (yielding) first: metadata waits are usually microseconds
        while not work.is_completed():
            now = time.monotonic()
            if now > deadline:
                self.fail(stage, now - start)
            time.sleep(0 if now < spin_until else 5e-5)
        work.wait()

    def fail(self, stage: str, waited: float) -> None:
        """Publish this rank's timeout, diagnose who is missing and raise."""
        msg_stage = f"call #{self.seq} ({stage})"
        store = self._store()
        arrived: Dict[int, str] = {self.rank: msg_stage}
        if store is not None:
            try:
                store.set(f"{self.prefix}/timeout/{self.rank}", msg_stage)
                grace_end = time.monotonic() + min(2.0, max(self.timeout_s, 0.2))
                while time.monotonic() < grace_end and len(arrived) < self.num_ranks:
                    for r in range(self.num_ranks):
                        if r not in arrived:
                            key = f"{self.prefix}/timeout/{r}"
                            if store.check([key]):
                                arrived[r] = store.get(key).decode()
                    time.sleep(0.02)
            except Exception as e:  # pragma: no cover - diagnosis is best effort
                log.debug("deep_ep timeout diagnosis failed: %s", e)
        missing = [r for r in range(self.num_ranks) if r not in arrived]
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
