"""Process-group setup and environment helpers DeepEP's test scripts import from ``deep_ep.utils.envs``.

``init_dist`` takes NCCL where every local rank has a GPU and gloo otherwise, so
the same scripts start on a CPU-only machine.
"""

from __future__ import annotations

import logging
import random
import socket
import sys
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from ..settings import env_raw

__all__ = [
    "init_dist",
    "init_seed",
    "get_local_seed",
    "get_global_seed",
    "dist_print",
    "default_device",
    "get_physical_domain_size",
    "get_logical_domain_size",
    "check_nvlink_connections",
    "check_torch_deterministic",
    "get_nvlink_gbs",
    "get_rdma_gbs",
    "check_fast_rdma_atomic_support",
]

log = logging.getLogger("deep_ep")

_state = {"local_rank": None, "local_seed": 0, "global_seed": 0, "device": None}


def init_seed(global_seed: int) -> None:
    """Seed torch and ``random`` with ``global_seed + rank`` (each rank differs, runs repeat).

    Args:
        global_seed: the seed shared by all ranks.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    _state["global_seed"], _state["local_seed"] = global_seed, global_seed + rank
    torch.manual_seed(global_seed + rank)
    random.seed(global_seed + rank)


def get_local_seed() -> int:
    """This rank's seed (``global seed + rank``).

    Returns:
        An int.
    """
    return _state["local_seed"]


def get_global_seed() -> int:
    """The seed shared by all ranks (last :func:`init_seed`).

    Returns:
        An int.
    """
    return _state["global_seed"]


def default_device() -> torch.device:
    """The device :func:`init_dist` chose (CUDA with NCCL, else CPU); before it, CUDA if available.

    Returns:
        A ``torch.device``.
    """
    if _state["device"] is not None:
        return _state["device"]
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def dist_print(s: str = "", once_in_node: bool = False) -> None:
    """Write a line to stdout from every rank (or local rank 0 only), then wait for all ranks.

    Args:
        s: the text.
        once_in_node: only the first local rank of each node writes.
    """
    local = _state["local_rank"]
    if local is None:
        local = int(env_raw("LOCAL_RANK") or (dist.get_rank() if dist.is_initialized() else 0))
    if not once_in_node or local == 0:
        sys.stdout.write(f"{s}\n")
        sys.stdout.flush()
    if dist.is_initialized():
        dist.barrier()


def init_dist(local_rank: int, num_local_ranks: int, seed: int = 0) -> Tuple[int, int, dist.ProcessGroup]:
    """Join the job's process group and return ``(rank, world_size, group of all ranks)``.

    Environment (as DeepEP's scripts expect): ``MASTER_ADDR`` (default 127.0.0.1), ``MASTER_PORT`` (8361),
    ``WORLD_SIZE`` = number of nodes (1), ``RANK`` = this node's index (0). Global rank is
    ``node * num_local_ranks + local_rank``. NCCL when CUDA has at least ``num_local_ranks`` devices (then
    this rank uses ``cuda:local_rank``, and torch's default device becomes CUDA), gloo otherwise. The
    default dtype becomes bfloat16, as DeepEP's scripts assume. If torch.distributed is already
    initialised it is reused.

    Args:
        local_rank: index of this process on its node.
        num_local_ranks: processes per node.
        seed: the global seed (:func:`init_seed`).

    Returns:
        ``(rank, world_size, group)``.
    """
    _state["local_rank"] = local_rank
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= num_local_ranks
    if not dist.is_initialized():
        addr = env_raw("MASTER_ADDR") or "127.0.0.1"
        port = int(env_raw("MASTER_PORT") or "8361")
        num_nodes = int(env_raw("WORLD_SIZE") or "1")
        node = int(env_raw("RANK") or "0")
        kwargs = dict(
            backend="nccl" if use_cuda else "gloo",
            init_method=f"tcp://{addr}:{port}",
            world_size=num_nodes * num_local_ranks,
            rank=node * num_local_ranks + local_rank,
        )
        if use_cuda:
            torch.cuda.set_device(local_rank)
            try:
                dist.init_process_group(device_id=torch.device("cuda", local_rank), **kwargs)
            except TypeError:  # older torch without device_id
                dist.init_process_group(**kwargs)
        else:
            dist.init_process_group(**kwargs)
    else:
        use_cuda = use_cuda and "nccl" in str(dist.get_backend()).lower()
    _state["device"] = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    torch.set_default_dtype(torch.bfloat16)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch.set_default_device("cuda")
    init_seed(seed)
    group = dist.new_group(list(range(dist.get_world_size())))
    return dist.get_rank(), dist.get_world_size(), group


def _hosts(group: dist.ProcessGroup) -> List[Optional[str]]:
    names: List[Optional[str]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(names, socket.gethostname(), group=group)
    return names


def get_physical_domain_size(group: dist.ProcessGroup) -> Tuple[int, int]:
    """``(nodes, ranks per node)`` by host name (collective: every rank of ``group`` must call).

    Args:
        group: the communication group.

    Returns:
        Two ints; ``(1, size)`` if the hosts hold different numbers of ranks.
    """
    names = _hosts(group)
    n, R = len(set(names)), len(names)
    return (n, R // n) if R % n == 0 else (1, R)


def get_logical_domain_size(group: dist.ProcessGroup, allow_hybrid_mode: bool = True) -> Tuple[int, int]:
    """``(scale-out ranks, scale-up ranks)`` an ElasticBuffer on ``group`` would use: the physical split with
    ``allow_hybrid_mode`` and several nodes, else ``(1, size)`` (collective).

    Args:
        group: the communication group.
        allow_hybrid_mode: V2's hybrid mode switch.

    Returns:
        Two ints.
    """
    nodes, per_node = get_physical_domain_size(group)
    if allow_hybrid_mode and nodes > 1:
        return nodes, per_node
    return 1, nodes * per_node


def check_nvlink_connections(group: dist.ProcessGroup) -> None:
    """V2 rejects PCIe GPU groups above 2 ranks; deep_ep's transports need no NVLink, so this only logs.

    Args:
        group: the communication group.
    """
    if torch.cuda.is_available() and "PCIE" in torch.cuda.get_device_name().upper():
        log.info("deep_ep: PCIe GPUs; the nvlink transport needs peer access (deep_ep picks another if absent)")


def check_torch_deterministic() -> None:
    """Raise if torch's deterministic algorithms and ``fill_uninitialized_memory`` are both on (V2's check:
    the fill kernels would race with the communication stream in V2; harmless in deep_ep, kept for parity)."""
    import torch.utils.deterministic as det

    if torch.are_deterministic_algorithms_enabled() and det.fill_uninitialized_memory:
        raise RuntimeError(
            "torch.use_deterministic_algorithms(True) together with "
            "torch.utils.deterministic.fill_uninitialized_memory=True is not supported"
        )


def get_nvlink_gbs(factor: float = 0.9) -> float:
    """NVLink bandwidth estimate in GB/s; deep_ep does not probe links, so 0 (unknown).

    Args:
        factor: V2's efficiency factor (unused).

    Returns:
        0.0.
    """
    return 0.0


def get_rdma_gbs(nic_name: str = "") -> float:
    """RDMA bandwidth estimate in GB/s; deep_ep does not probe NICs, so 0 (unknown).

    Args:
        nic_name: V2's NIC name (unused).

    Returns:
        0.0.
    """
    return 0.0


def check_fast_rdma_atomic_support(nic_name: str = "") -> bool:
    """V2 checks the NIC model; deep_ep uses no RDMA atomics.

    Args:
        nic_name: V2's NIC name (unused).

    Returns:
        False.
    """
    return False
