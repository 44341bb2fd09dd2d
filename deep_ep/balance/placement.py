"""Placement tables: ``phy2log`` and what derives from it.

A placement of ``P`` physical expert slots on ``G`` GPUs is ``phy2log``
(int64 ``[P]``, or ``[layers, P]``): the logical expert held by every slot,
slot ``p`` on GPU ``p // (P // G)`` (DeepSeek EPLB's convention). Shared by
the planner, the router, the monitor, the simulation and the wrapper:

* :func:`replica_table` -- one layer's slots of every expert (EPLB's
  ``log2phy`` row), ascending, ``-1`` padded;
* :func:`contiguous_phy2log` -- the static placement (expert ``e`` on GPU
  ``e // (E / G)``), spare slots filled with copies of the GPU's own experts;
* :func:`gpu_loads` -- per-GPU load when each expert's load is split evenly
  among its replicas;
* :func:`moved_experts` -- replicas a re-plan must copy onto GPUs.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from ..errors import DeepEPInputError

__all__ = ["replica_table", "contiguous_phy2log", "gpu_loads", "moved_experts"]


def host_int64(x: Any) -> np.ndarray:
    """Any integer array-like (tensor on any device, numpy, list) as an int64 numpy array on the host."""
    return torch.as_tensor(x).detach().to("cpu", torch.int64).numpy()


def replica_table(phy2log: np.ndarray, counts: np.ndarray, width: Optional[int] = None) -> np.ndarray:
    """int64 ``[E, width]``: the slots of every expert in one layer's ``phy2log [P]``, ascending, ``-1`` padded.

    ``counts [E]`` is ``bincount(phy2log)``; ``width`` defaults to its maximum.
    """
    num_slots = phy2log.shape[0]
    order = np.argsort(phy2log, kind="stable")  # slots grouped by expert, ascending
    experts = phy2log[order]
    first = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank_in = np.arange(num_slots) - first[experts]
    out = np.full((counts.shape[0], int(counts.max()) if width is None else width), -1, dtype=np.int64)
    out[experts, rank_in] = order
    return out


def contiguous_phy2log(num_experts: int, num_gpus: int, spare_per_gpu: int = 0) -> torch.Tensor:
    """Static contiguous placement in slot form: GPU ``g`` holds experts ``g*L .. g*L+L-1``; its spare
    slots hold extra copies of its own first experts (they get no load under the static policy)."""
    if num_experts % num_gpus:
        raise DeepEPInputError(f"{num_experts} experts do not split evenly over {num_gpus} GPUs")
    per = num_experts // num_gpus
    rows = []
    for g in range(num_gpus):
        own = list(range(g * per, (g + 1) * per))
        rows.extend(own + [own[i % per] for i in range(spare_per_gpu)])
    return torch.as_tensor(rows, dtype=torch.int64)


def gpu_loads(weight, phy2log, num_gpus: int) -> torch.Tensor:
    """Per-GPU load when every expert's load is split evenly among its replicas.

    ``weight [n, E]`` (or ``[E]``): ``n`` layers or steps; ``phy2log [n, P]``
    (one placement per row) or ``[P]`` (the same for every row). Returns
    float64 ``[n, num_gpus]`` on the CPU.
    """
    w = torch.as_tensor(weight).detach().to("cpu", torch.float64)
    p = torch.as_tensor(phy2log).detach().to("cpu", torch.int64)
    w = w.reshape(-1, w.shape[-1])
    p = p.reshape(-1, p.shape[-1]).expand(w.shape[0], -1)
    cnt = torch.zeros_like(w).scatter_add_(1, p, torch.ones(p.shape, dtype=torch.float64))
    per_slot = (w / cnt.clamp(min=1)).gather(1, p)
    return per_slot.view(w.shape[0], num_gpus, -1).sum(-1)


def moved_experts(prev_phy2log, phy2log, num_gpus: int) -> int:
    """Expert weights a re-plan must copy: per GPU, the new replicas it did not hold before.

    Both maps ``[layers, P]`` or ``[P]``; a replica that stays on its GPU (in
    any slot) costs nothing. Summed over layers and GPUs.
    """
    a = host_int64(prev_phy2log)
    b = host_int64(phy2log)
    a = a.reshape(-1, a.shape[-1])
    b = b.reshape(-1, b.shape[-1])
    num_experts = int(max(a.max(), b.max())) + 1
    return sum(
        int(
            np.maximum(
                gpu_expert_counts(lb, num_gpus, num_experts) - gpu_expert_counts(la, num_gpus, num_experts), 0
            ).sum()
        )
        for la, lb in zip(a, b)
    )


def gpu_expert_counts(phy2log: np.ndarray, num_gpus: int, num_experts: int) -> np.ndarray:
    """int64 ``[num_gpus, num_experts]``: replicas of every expert on every GPU (one layer's ``phy2log [P]``)."""
    out = np.zeros((num_gpus, num_experts), dtype=np.int64)
    rows = np.repeat(np.arange(num_gpus), phy2log.shape[0] // num_gpus)
    np.add.at(out, (rows, phy2log), 1)
    return out
