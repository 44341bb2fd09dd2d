"""Transports: how rows move between ranks (one interface, several implementations).

:func:`select_backend` holds the rule ``Buffer(backend='auto')`` follows;
``deep-ep info`` prints the same decision with its reasons.
"""

from __future__ import annotations

import importlib.util
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .base import Plan, Transport, Waiter
from .collective import CollectiveTransport

__all__ = [
    "Plan",
    "Transport",
    "Waiter",
    "CollectiveTransport",
    "BACKENDS",
    "backend_support",
    "select_backend",
    "transport_class",
    "group_device",
    "group_on_cuda",
]

#: every backend name ``Buffer(backend=...)`` accepts, with the issue that adds it where not yet built
BACKENDS: Dict[str, Optional[str]] = {
    "collective": None,
    "nvlink": None,
    "hierarchical": None,
}


#: 'auto' takes nvlink up to this many ranks: at 4 ranks NCCL was faster
#: (benchmarks/results/2026-11-28-nvidia-h200-x4-normal-peer-streams.json)
NVLINK_MAX_RANKS = 2
#: whether 'auto' picks nvlink where it is usable: on 2 x H200 it measured faster than collective
#: (benchmarks/results/2026-12-01-nvidia-h200-normal.json)
NVLINK_PREFERRED = True


def _backend_str(group: Optional[dist.ProcessGroup] = None) -> str:
    """The group's backend, lower case; for a group made without naming one (``'undefined'``) its
    per-device configuration (``'cpu:gloo,cuda:nccl'`` where NCCL exists)."""
    be = str(dist.get_backend(group)).lower()
    if be == "undefined":
        try:
            be = str(dist.get_backend_config(group)).lower()
        except Exception:  # pragma: no cover - older torch
            pass
    return be


def group_on_cuda(group: Optional[dist.ProcessGroup] = None) -> bool:
    """True when the group's collectives take CUDA tensors: an NCCL group, or a mixed backend string
    that names one for CUDA (``'cpu:gloo,cuda:gloo'``, ``'cpu:gloo,cuda:nccl'``, or a group made without
    naming a backend on a machine with NCCL)."""
    be = _backend_str(group)
    return "nccl" in be or "cuda:" in be


def group_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """The device a group works on: the current CUDA device for a CUDA group (:func:`group_on_cuda`), else CPU."""
    if group_on_cuda(group):
        if not torch.cuda.is_available():
            from ..errors import DeepEPError

            raise DeepEPError(f"the {dist.get_backend(group)} group needs CUDA")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def transport_class(name: str) -> type:
    """The :class:`Transport` subclass of a backend name; ``NotImplementedError`` for one not built yet."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of 'auto', {', '.join(repr(b) for b in BACKENDS)}")
    if name == "collective":
        return CollectiveTransport
    if name == "nvlink":
        from .nvlink import NVLinkTransport  # imports symmetric memory lazily

        return NVLinkTransport
    if name == "hierarchical":
        from .hierarchical import HierarchicalTransport

        return HierarchicalTransport
    raise NotImplementedError(
        f"backend={name!r} is not implemented yet: it arrives with {BACKENDS[name]}; "
        f"use backend='collective' (works everywhere) or 'auto'"
    )


def _one_host(group: dist.ProcessGroup) -> bool:
    """Whether every rank of ``group`` runs on this host (collective: exchanges hostnames)."""
    import socket

    names: List[Optional[str]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(names, socket.gethostname(), group=group)
    return len(set(names)) == 1


def backend_support(group: Optional[dist.ProcessGroup] = None) -> List[Tuple[str, bool, str]]:
    """For each backend: ``(name, usable here, reason)``.

    With ``group`` the answer is for that process group; without one it is
    for this machine (all local GPUs).
    """
    out: List[Tuple[str, bool, str]] = []
    if group is not None:
        be = _backend_str(group)
        ok = be in ("gloo", "nccl", "mpi") or "nccl" in be or "gloo" in be
        out.append(("collective", ok, f"torch.distributed all_to_all_single on the {be} group"))
    else:
        out.append(("collective", True, "torch.distributed all_to_all_single (NCCL on GPUs, gloo on CPU)"))
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    reasons = []
    if group is not None and not group_on_cuda(group):
        reasons.append("the group is not a CUDA (NCCL) group")
    if n < 2:
        reasons.append(f"needs >= 2 local GPUs (found {n})")
    else:
        peer = all(torch.cuda.can_device_access_peer(i, j) for i in range(n) for j in range(n) if i != j)
        if not peer:
            reasons.append("not every pair of local GPUs has peer access")
    if group is not None and group_on_cuda(group) and not _one_host(group):
        reasons.append("the group spans more than one host")
    if importlib.util.find_spec("torch.distributed._symmetric_memory") is None:
        reasons.append("torch symmetric memory is unavailable")
    if BACKENDS["nvlink"] is not None:
        reasons.append(f"not implemented yet ({BACKENDS['nvlink']})")
    out.append(("nvlink", not reasons, "; ".join(reasons) or "all ranks on one host with peer access"))
    if group is not None and group is not dist.group.WORLD and dist.get_world_size(group) != dist.get_world_size():
        out.append(("hierarchical", False, "needs the default process group (it builds rail and node groups)"))
    else:
        out.append(("hierarchical", True, "nodes from the hostnames (or ranks_per_node / DEEP_EP_RANKS_PER_NODE)"))
    return out


def select_backend(group: Optional[dist.ProcessGroup] = None, topology_aware: bool = True) -> Tuple[str, str]:
    """The backend ``'auto'`` picks, and why: the fastest one the group supports.

    A group that spans several hosts takes ``hierarchical`` (one copy of a token per node across nodes)
    unless ``topology_aware`` is off. Without ``group`` the answer is for an NCCL group of all local GPUs.
    """
    support = {name: (ok, why) for name, ok, why in backend_support(group)}
    if group is not None and not _one_host(group):
        if topology_aware and support["hierarchical"][0]:
            return "hierarchical", "the group spans several hosts: one copy of a token per node across nodes"
        return "collective", (
            "the group spans several hosts; topology_aware is off"
            if not topology_aware
            else f"the group spans several hosts; hierarchical: {support['hierarchical'][1]}"
        )
    ok, why = support["nvlink"]
    ranks = (
        dist.get_world_size(group)
        if group is not None
        else (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    )
    if ok and NVLINK_PREFERRED and ranks > NVLINK_MAX_RANKS:
        return "collective", (
            f"nvlink is usable, but at more than {NVLINK_MAX_RANKS} ranks NCCL was measured "
            f"faster (4 x H200); pass backend='nvlink' to use it"
        )
    if ok and NVLINK_PREFERRED:
        return "nvlink", "every rank is on one host with peer access"
    if ok:
        return "collective", "nvlink is usable but not preferred (NVLINK_PREFERRED is off)"
    return "collective", f"nvlink not usable: {why}"
