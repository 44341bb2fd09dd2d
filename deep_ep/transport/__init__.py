"""Transports: how rows move between ranks (one interface, several implementations).

Each transport registers its name and its class here (:func:`register`); the class says whether
it can serve a group (:meth:`~deep_ep.transport.base.Transport.supported`) and declares its
capabilities as attributes of :class:`~deep_ep.transport.base.Transport`. Adding a transport is
one new module (a ``Transport`` subclass), one :func:`register` line below, and its name in the
conformance matrix (``tests/test_conformance.py``).

:func:`select_backend` holds the rule ``Buffer(backend='auto')`` follows;
``deep-ep info`` prints the same decision with its reasons.
"""

from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .base import Plan, Transport, Waiter, group_device, group_on_cuda, one_host
from .collective import CollectiveTransport

__all__ = [
    "Plan",
    "Transport",
    "Waiter",
    "CollectiveTransport",
    "BACKENDS",
    "register",
    "backend_support",
    "select_backend",
    "transport_class",
    "group_device",
    "group_on_cuda",
]

#: every registered backend name and where its class lives (``"module:Class"``, imported on first use)
BACKENDS: Dict[str, str] = {}
_CLASSES: Dict[str, type] = {}


def register(name: str, target: str) -> None:
    """Make ``Buffer(backend=name)`` use the :class:`Transport` subclass ``target``.

    Args:
        name: the backend's name (``'collective'``, ...).
        target: ``"package.module:ClassName"`` (relative to this package when it starts with ``.``),
            imported when the backend is first used or its support is asked.
    """
    BACKENDS[name] = target
    _CLASSES.pop(name, None)


register("collective", ".collective:CollectiveTransport")
register("nvlink", ".nvlink:NVLinkTransport")
register("hierarchical", ".hierarchical:HierarchicalTransport")


def transport_class(name: str) -> type:
    """The :class:`Transport` subclass registered as ``name``; ``ValueError`` for an unknown name."""
    cls = _CLASSES.get(name)
    if cls is not None:
        return cls
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of 'auto', {', '.join(repr(b) for b in BACKENDS)}")
    module, _, attr = BACKENDS[name].partition(":")
    cls = _CLASSES[name] = getattr(importlib.import_module(module, __name__), attr)
    return cls


def backend_support(group: Optional[dist.ProcessGroup] = None) -> List[Tuple[str, bool, str]]:
    """For each registered backend: ``(name, usable here, reason)``.

    With ``group`` the answer is for that process group; without one it is
    for this machine (all local GPUs).
    """
    return [(name, *transport_class(name).supported(group)) for name in BACKENDS]


#: 'auto' takes nvlink up to this many ranks: at 4 ranks NCCL was faster
#: (benchmarks/results/2026-11-28-nvidia-h200-x4-normal-peer-streams.json)
NVLINK_MAX_RANKS = 2
#: whether 'auto' picks nvlink where it is usable: on 2 x H200 it measured faster than collective
#: (benchmarks/results/2026-12-01-nvidia-h200-normal.json)
NVLINK_PREFERRED = True


def select_backend(group: Optional[dist.ProcessGroup] = None, topology_aware: bool = True) -> Tuple[str, str]:
    """The backend ``'auto'`` picks, and why: the fastest one the group supports.

    A group that spans several hosts takes ``hierarchical`` (one copy of a token per node across nodes)
    unless ``topology_aware`` is off. Without ``group`` the answer is for an NCCL group of all local GPUs.
    """
    support = {name: (ok, why) for name, ok, why in backend_support(group)}
    if group is not None and not one_host(group):
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
