"""Starting ranks on this host: the launch boilerplate of ``deep-ep bench``, ``deep-ep demo`` and the tools.

- :func:`launch` starts ``target(rank, *args, port, result_path)`` on N local processes and waits for
  them (``spawn`` for GPU ranks, ``fork`` for CPU ranks where that is safe);
- :func:`init_rank` is the first thing such a rank does: its device (GPU rank ``r`` on ``cuda:r``; a CPU
  rank gets its share of the cores as torch threads, since N ranks each using every core run many times
  slower) and its process group (NCCL or gloo, on the port :func:`launch` chose);
- :func:`init_single_rank` makes a one-rank group in this process (the one-GPU tools);
- :func:`torchrun_rank` and :func:`local_rank` read a ``torchrun`` launch (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = [
    "free_port",
    "cpu_threads_per_rank",
    "init_rank",
    "init_single_rank",
    "launch",
    "local_rank",
    "torchrun_rank",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Returns:
        The port number.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_threads_per_rank(world_size: int) -> int:
    """Torch threads for one of ``world_size`` CPU ranks on this host: its share of the cores.

    Args:
        world_size: ranks running on this host at once.

    Returns:
        ``max(1, cores // world_size)``.
    """
    return max(1, (os.cpu_count() or 1) // max(1, world_size))


def init_rank(rank: int, world_size: int, device: str, port: int, timeout_s: float = 300.0) -> torch.device:
    """Set up one launched rank: its device, its torch threads, its default process group.

    Args:
        rank: this rank.
        world_size: ranks in the job.
        device: ``'cuda'`` (rank ``r`` on ``cuda:r``, NCCL) or ``'cpu'`` (gloo, with
            :func:`cpu_threads_per_rank` torch threads).
        port: the rendezvous port on 127.0.0.1 (what :func:`launch` passes).
        timeout_s: the process group's timeout.

    Returns:
        The rank's ``torch.device``.
    """
    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
    else:
        torch.set_num_threads(cpu_threads_per_rank(world_size))
        dev = torch.device("cpu")
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **(dict(device_id=dev) if cuda else {}),
    )
    return dev


def init_single_rank(device: str = "cuda") -> torch.device:
    """A process group of this process alone (the one-GPU tools): NCCL on ``cuda:0``, or gloo on the CPU.

    Args:
        device: ``'cuda'`` or ``'cpu'``.

    Returns:
        The rank's ``torch.device``.
    """
    return init_rank(0, 1, device, free_port())


def torchrun_rank() -> Optional[Tuple[int, int, int]]:
    """``(rank, world_size, local_rank)`` of a process started by ``torchrun``; ``None`` otherwise.

    Returns:
        The three ints, or ``None`` when ``RANK`` / ``WORLD_SIZE`` are not set.
    """
    from deep_ep.settings import env_raw

    rank, world = env_raw("RANK"), env_raw("WORLD_SIZE")
    if rank is None or world is None:
        return None
    local = env_raw("LOCAL_RANK")
    return int(rank), int(world), int(local) if local is not None else int(rank)


def local_rank(default: int) -> int:
    """This process's ``LOCAL_RANK`` (set by ``torchrun``), or ``default``.

    Args:
        default: the value without ``torchrun`` (e.g. ``rank % torch.cuda.device_count()``).

    Returns:
        The local rank.
    """
    from deep_ep.settings import env_raw

    raw = env_raw("LOCAL_RANK")
    return int(raw) if raw is not None else default


def _run_then_exit(rank: int, target: Callable, *args) -> None:
    """A launched rank: ``target(rank, *args)``, then leave the process without the interpreter's teardown.

    Every result is written (and the process group destroyed) when ``target`` returns. Spawned children
    otherwise run Python's full shutdown, in which torch / gloo C++ threads are sometimes destroyed while
    still joinable ("terminate called without an active exception", SIGABRT: seen in ~10% of CPU demo
    runs under pytest, always after ``destroy_process_group``), which fails the whole launch. An exception
    of ``target`` still propagates (and is reported by the parent)."""
    target(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(
    target: Callable, args: tuple, result_path: Optional[str], nprocs: int, device: str, fork_ok: bool = True
) -> None:
    """Start ``target(rank, *args, port, result_path)`` on ``nprocs`` local processes and wait for them.

    GPU ranks are started with ``spawn`` (CUDA does not survive ``fork``), after NVLink multicast is
    switched off for NCCL and symmetric memory unless the caller set otherwise. CPU ranks are forked
    where ``fork_ok`` (they start in milliseconds instead of re-importing torch), and spawned when this
    process has a process group already. A rendezvous port taken between choosing and binding it
    (another process's ephemeral port) is retried once with a new one.

    Args:
        target: the rank's body; it should call :func:`init_rank` with the port it is given.
        args: ``target``'s arguments after ``rank``.
        result_path: passed to ``target`` last (where rank 0 leaves its results), or ``None``.
        nprocs: ranks to start.
        device: ``'cuda'`` or ``'cpu'``.
        fork_ok: CPU ranks may be forked (pass ``False`` for ranks that compute much on CPU: a forked
            child that computes on the OpenMP pool its parent started can hang, libgomp is not fork-safe).

    Raises:
        torch.multiprocessing.ProcessRaisedException: a rank raised (its traceback in the message).
    """
    import torch.multiprocessing as mp

    if device == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    method = "fork" if device != "cuda" and fork_ok and not dist.is_initialized() else "spawn"
    for attempt in range(2):
        try:
            mp.start_processes(
                _run_then_exit,
                args=(target,) + tuple(args) + (free_port(), result_path),
                nprocs=nprocs,
                join=True,
                start_method=method,
            )
            return
        except mp.ProcessRaisedException as exc:
            text = str(exc).lower()
            if attempt or not ("address already in use" in text or "eaddrinuse" in text):
                raise
