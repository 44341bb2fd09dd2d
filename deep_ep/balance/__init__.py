"""Dynamic expert load balancing (docs/api.md, deep_ep.balance; ours).

* :class:`LoadMonitor` -- per-step per-expert counts (all-reduced over the EP
  group when given one), a history window, :meth:`~LoadMonitor.forecast` of
  the coming load and :meth:`~LoadMonitor.imbalance` figures;
* :func:`rebalance_experts` -- replica counts and placement with DeepSeek
  EPLB's shapes ``(phy2log, log2phy, logcnt)``, hierarchical when groups
  divide nodes, optionally relabelled to move few weights;
* :class:`ReplicaRouter` -- sends every (token, expert) pair to one replica of
  its expert; with the step's global counts all ranks derive the same
  per-replica quotas that even out the per-GPU load of this step (work
  stealing) without further communication;
* :func:`migrate_experts` -- moves expert weights (and optimizer state) to a
  new placement, bit-exactly (plan: :func:`plan_migration`);
* :class:`BalancedDispatch` -- the wiring into :class:`deep_ep.Buffer`:
  logical -> physical ids before dispatch (one all-reduce of the step's
  counts), counts into the monitor, re-plan and migrate every N steps.

Modules: ``monitor``, ``planner`` (with its packing core in ``packing``),
``placement`` (``phy2log`` helpers), ``router``, ``migration_plan``,
``migrate`` and ``balanced``. :mod:`deep_ep.balance.simulate` holds the drifting-popularity
trace and the policy simulation used by ``benchmarks/bench_balance.py``.
"""

from __future__ import annotations

from .balanced import BalancedDispatch
from .migrate import migrate_experts
from .migration_plan import MigrationPlan, placement_moves, plan_migration
from .monitor import LoadMonitor
from .placement import contiguous_phy2log, gpu_loads, moved_experts
from .planner import rebalance_experts, replica_counts
from .router import ReplicaRouter

__all__ = [
    "LoadMonitor",
    "rebalance_experts",
    "ReplicaRouter",
    "replica_counts",
    "moved_experts",
    "gpu_loads",
    "contiguous_phy2log",
    "migrate_experts",
    "placement_moves",
    "plan_migration",
    "MigrationPlan",
    "BalancedDispatch",
]
