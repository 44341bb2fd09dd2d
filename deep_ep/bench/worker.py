"""The per-rank entry of ``deep-ep bench``: process group, cases, results to rank 0.

:func:`spawn` starts ``cfg.world_size`` processes on this host (one GPU each
over NCCL, or CPU ranks over gloo). Rank 0 shows the progress bar and writes
every rank's raw measurements to a pickle the parent reads.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import sys

import torch
import torch.distributed as dist

from deep_ep.bench.cases import RankRunner, plan
from deep_ep.bench.timing import CpuTimer, CudaTimer
from deep_ep.bench.workload import make_workload


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _progress_bar(total: int, enabled: bool):
    """``(update(n), close())`` of a tqdm bar on stderr; no-ops when disabled, not a TTY, or no tqdm."""
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            bar = tqdm(
                total=total,
                desc="deep-ep bench",
                unit="case",
                file=sys.stderr,
                dynamic_ncols=True,
                leave=False,
                disable=None,
            )  # None: off when not a TTY
            return bar.update, bar.close
    return (lambda n=1: None), (lambda: None)


def backends_to_run(cfg, group) -> tuple:
    """``(names, {name: reason it cannot run on group})``: the backends of the run.

    Without ``--backend``: every backend deep_ep knows, those its own rule
    (:func:`deep_ep.transport.backend_support`) rejects for ``group`` to be
    skipped with that rule's reason. Backends named on the command line are
    always tried; what they raise becomes the reason.
    """
    from deep_ep import transport

    if cfg.backends:
        return list(cfg.backends), {}
    support = {name: (ok, why) for name, ok, why in transport.backend_support(group)}
    names = list(transport.BACKENDS)
    return names, {n: support[n][1] for n in names if n in support and not support[n][0]}


def rank_main(rank: int, cfg, port: int, result_path: str) -> None:
    """Body of one spawned rank (``torch.multiprocessing.spawn`` target)."""
    world = cfg.world_size
    if cfg.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        device = torch.device("cpu")
    kwargs = dict(device_id=device) if cfg.device == "cuda" else {}
    dist.init_process_group(
        cfg.dist_backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=cfg.timeout_s),
        **kwargs,
    )
    try:
        group = dist.group.WORLD
        ctrl = dist.new_group(backend="gloo")
        timer = CudaTimer(device, cfg.flush_bytes) if cfg.device == "cuda" else CpuTimer(ctrl)
        backends, unsupported = backends_to_run(cfg, group)
        update, close = _progress_bar(len(plan(cfg, backends)), cfg.progress and rank == 0)
        runner = RankRunner(cfg, rank, group, ctrl, device, timer, update)
        try:
            for tokens in cfg.tokens:
                wl = make_workload(cfg, tokens, rank, device, group)
                for name in backends:
                    runner.run_backend(name, wl, unsupported.get(name))
                if cfg.baselines:
                    runner.run_raw(wl)
                    if cfg.device == "cuda":
                        runner.run_peer_copy(wl)
                del wl
        finally:
            close()
        per_rank = [None] * world
        dist.all_gather_object(per_rank, runner.records, group=ctrl)
        if rank == 0:
            card = torch.cuda.get_device_name(device) if cfg.device == "cuda" else "cpu"
            with open(result_path, "wb") as f:
                pickle.dump(dict(records=per_rank, skipped=runner.skipped, card=card, backends=backends), f)
        dist.barrier(group=ctrl)
        runner.buffers.clear()
    finally:
        dist.destroy_process_group()


def spawn(cfg, result_path: str) -> None:
    """Run :func:`rank_main` on ``cfg.world_size`` local processes and wait for them.

    GPU ranks are started with ``spawn`` (CUDA does not survive ``fork``), after
    NVLink multicast is switched off for NCCL and symmetric memory unless the
    caller set otherwise. CPU ranks are forked: they start in milliseconds
    instead of re-importing torch, and the parent has not touched CUDA.
    """
    launch(rank_main, (cfg,), result_path, cfg.world_size, cfg.device)


def _run_then_exit(rank: int, target, *args) -> None:
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


def launch(target, args: tuple, result_path: str, nprocs: int, device: str, fork_ok: bool = True) -> None:
    """Start ``target(rank, *args, port, result_path)`` on ``nprocs`` local processes and wait for them
    (the runner of ``deep-ep bench`` in every mode and of ``deep-ep demo``): ``spawn`` for GPU ranks,
    after switching NVLink multicast off unless the caller set otherwise; ``fork`` for CPU ranks where
    ``fork_ok`` (``spawn`` when this process has a process group already). A
    rendezvous port taken between choosing and binding it (another process's ephemeral port) is retried
    once with a new one."""
    import torch.multiprocessing as mp

    if device == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    # fork only from a parent without CUDA or a process group of its own (a notebook may have one), and
    # only for ranks that do little CPU math: a forked child that computes on the OpenMP pool its parent
    # started can hang (libgomp is not fork-safe), so the demo and the low-latency bench spawn
    method = "fork" if device != "cuda" and fork_ok and not dist.is_initialized() else "spawn"
    for attempt in range(2):
        try:
            mp.start_processes(
                _run_then_exit,
                args=(target,) + args + (free_port(), result_path),
                nprocs=nprocs,
                join=True,
                start_method=method,
            )
            return
        except mp.ProcessRaisedException as exc:
            text = str(exc).lower()
            if attempt or not ("address already in use" in text or "eaddrinuse" in text):
                raise
