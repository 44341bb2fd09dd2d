"""The per-rank entry of ``deep-ep bench``: process group, cases, results to rank 0.

:func:`spawn` starts ``cfg.world_size`` processes on this host (one GPU each
over NCCL, or CPU ranks over gloo). Rank 0 shows the progress bar and writes
every rank's raw measurements to a pickle the parent reads.
"""

from __future__ import annotations

import pickle
import sys

import torch
import torch.distributed as dist

from deep_ep.bench.cases import RankRunner, plan
from deep_ep.bench.launch import free_port, init_rank, launch  # noqa: F401  (free_port: re-exported)
from deep_ep.bench.timing import CpuTimer, CudaTimer
from deep_ep.bench.workload import make_workload


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
    """The backends of a run.

    Without ``--backend``: every backend deep_ep knows, those its own rule
    (:func:`deep_ep.transport.backend_support`) rejects for ``group`` to be
    skipped with that rule's reason. Backends named on the command line are
    always tried; what they raise becomes the reason.

    Args:
        cfg: the run.
        group: the data process group.

    Returns:
        ``(names, {name: reason it cannot run on group})``.
    """
    from deep_ep import transport

    if cfg.backends:
        return list(cfg.backends), {}
    support = {name: (ok, why) for name, ok, why in transport.backend_support(group)}
    names = list(transport.BACKENDS)
    return names, {n: support[n][1] for n in names if n in support and not support[n][0]}


def with_support_reason(name: str, reason: str, group) -> str:
    """Why a Buffer of backend ``name`` could not be made, with the transport's own support check for
    ``group`` where that says it cannot serve it (the check names what is missing).

    Args:
        name: the backend.
        reason: the error the Buffer raised (agreed, naming the rank).
        group: the process group.

    Returns:
        The reason, extended.
    """
    from deep_ep import transport

    why = {n: (ok, w) for n, ok, w in transport.backend_support(group)}.get(name)
    if why is None or why[0] or why[1] in reason:
        return reason
    return f"{reason} (its support check: {why[1]})"


def rank_main(rank: int, cfg, port: int, result_path: str) -> None:
    """Body of one launched rank of the normal workload (the :func:`~deep_ep.bench.launch.launch` target).

    Args:
        rank: this rank.
        cfg: the run.
        port: the rendezvous port.
        result_path: where rank 0 pickles every rank's records.
    """
    world = cfg.world_size
    device = init_rank(rank, world, cfg.device, port, cfg.timeout_s)
    try:
        group = dist.group.WORLD
        ctrl = dist.new_group(backend="gloo")
        timer = CudaTimer(device, cfg.flush_bytes) if cfg.device == "cuda" else CpuTimer(ctrl)
        backends, unsupported = backends_to_run(cfg, group)
        update, close = _progress_bar(len(plan(cfg, backends)), cfg.progress and rank == 0)
        runner = RankRunner(cfg, rank, group, ctrl, device, timer, update)
        unavailable = {}
        if cfg.backends:  # asked for by name: opened first, so that none that cannot run costs a run
            for name in backends:
                _, reason = runner.open_backend(name, None)
                if reason:
                    unavailable[name] = with_support_reason(name, reason, group)
        try:
            for tokens in cfg.tokens if len(unavailable) < len(backends) else ():
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
                pickle.dump(
                    dict(
                        records=per_rank,
                        skipped=runner.skipped,
                        card=card,
                        backends=backends,
                        unavailable=unavailable,
                    ),
                    f,
                )
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

    Args:
        cfg: the run.
        result_path: where rank 0 leaves the raw records.
    """
    launch(rank_main, (cfg,), result_path, cfg.world_size, cfg.device)
