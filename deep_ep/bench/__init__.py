"""``deep-ep bench``: the docs/bench.md normal-mode benchmark of dispatch and combine.

Spawns its own ranks on this host (every GPU over NCCL, or 2 CPU ranks over
gloo), times each deep_ep backend (cached dispatch, dispatch from scratch,
combine) and the baselines (``nccl-raw``/``gloo-raw``: one all_to_all_single of
the rows that must move; ``peer-copy``: the same remote bytes copied into the
peers' symmetric memory, GPU only), prints a table and writes the docs/bench.md
result file.

Programmatic use::

    from deep_ep.bench import BenchConfig, run
    result = run(BenchConfig(device="cpu", world_size=2, tokens=(32,), hidden=256, topk=2,
                             experts=8, wires=("bf16",), backends=None, num_sms=None,
                             iters=3, warmup=1))
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
from typing import Optional, Sequence

from deep_ep.bench.options import BenchConfig, BenchOptionError, add_arguments, config_from_args
from deep_ep.bench.report import build_result, format_table, write_json

__all__ = [
    "BenchConfig",
    "BenchOptionError",
    "add_arguments",
    "banner",
    "config_from_args",
    "run",
    "run_from_args",
    "main",
]


def run(cfg: BenchConfig, command: str = "deep-ep bench") -> dict:
    """Run the benchmark described by ``cfg``.

    With ``cfg.num_sms_sweep`` one run per SM count, merged into one result (the baselines from the first,
    every row's ``ratio_vs`` against them; each row says its ``num_sms``).

    Args:
        cfg: the resolved run (:func:`config_from_args`, or built by hand as the module docstring shows).
        command: the command line recorded in the result.

    Returns:
        The docs/bench.md result object (``unavailable``: backends asked for by name that could not run).
    """
    if len(cfg.num_sms_sweep) > 1:
        import dataclasses

        from deep_ep.bench.report import add_ratios

        merged = None
        for i, sms in enumerate(cfg.num_sms_sweep):
            one = run(
                dataclasses.replace(cfg, num_sms=sms, num_sms_sweep=(), baselines=cfg.baselines and i == 0), command
            )
            if merged is None:
                merged = one
            else:
                merged["rows"] += one["rows"]
                merged["skipped"] += [s_ for s_ in one["skipped"] if s_ not in merged["skipped"]]
                merged["unavailable"] = {**one.get("unavailable", {}), **merged.get("unavailable", {})}
        add_ratios(cfg, merged["rows"])
        merged["num_sms_sweep"] = list(cfg.num_sms_sweep)
        return merged
    with tempfile.TemporaryDirectory(prefix="deep_ep_bench_") as tmp:
        path = os.path.join(tmp, "raw.pkl")
        from deep_ep.bench.worker import spawn

        spawn(cfg, path)
        with open(path, "rb") as f:
            raw = pickle.load(f)
    return build_result(cfg, raw, command)


def banner(cfg: BenchConfig) -> str:
    """The line ``deep-ep bench`` prints before a run: ranks, workload, wire formats, iterations.

    Args:
        cfg: the resolved run.

    Returns:
        One line.
    """
    if cfg.workload == "low-latency":
        from deep_ep.bench.low_latency import experts_of

        wire = "fp8 dispatch, bf16 combine"
        experts = experts_of(cfg)
    else:
        wire = "+".join(cfg.wires) + " dispatch, bf16 combine"
        experts = cfg.experts
    return (
        f"deep-ep bench --mode {'low-latency' if cfg.workload == 'low-latency' else 'normal'}: "
        f"{cfg.world_size} {cfg.device} ranks ({cfg.dist_backend}), tokens {','.join(map(str, cfg.tokens))} per rank, "
        f"hidden {cfg.hidden}, top-{cfg.topk} of {experts} experts, wire {wire}, {cfg.iters} iters"
    )


def unavailable_error(cfg: BenchConfig, result: dict) -> Optional[str]:
    """The error of a run in which no backend asked for by name could run (``None`` otherwise).

    Args:
        cfg: the run.
        result: its result object (``unavailable``: ``{backend: reason}``).

    Returns:
        One line naming each backend and why it cannot run, or ``None``.
    """
    bad = result.get("unavailable") or {}
    if not cfg.backends or any(b not in bad for b in cfg.backends):
        return None
    return "; ".join(f"--backend {b} cannot run here: {why}" for b, why in bad.items())


def run_from_args(args: argparse.Namespace, command: str) -> int:
    """Run from parsed ``deep-ep bench`` options: print the table, write ``--json``.

    Args:
        args: the parsed options (:func:`add_arguments`).
        command: the command line, recorded in the result.

    Returns:
        The exit status: 0, 2 for bad options, 1 when no backend asked for by name can run here.
    """
    try:
        cfg = config_from_args(args)
    except BenchOptionError as exc:
        print(f"deep-ep bench: error: {exc}", file=sys.stderr)
        return 2
    print(banner(cfg), file=sys.stderr)
    for note in cfg.notes:
        print(f"deep-ep bench: note: {note}", file=sys.stderr)
    if cfg.workload == "low-latency":
        from deep_ep.bench.low_latency import format_low_latency, run_low_latency

        result = run_low_latency(cfg, command)
        text = format_low_latency
    else:
        result = run(cfg, command)
        text = format_table
    error = unavailable_error(cfg, result)
    if error:
        print(f"deep-ep bench: error: {error}", file=sys.stderr)
        return 1
    for name, why in (result.get("unavailable") or {}).items():
        print(f"deep-ep bench: note: --backend {name} cannot run here, skipped: {why}", file=sys.stderr)
    print(text(result))
    if args.json:
        write_json(result, args.json)
    if getattr(args, "png", None) and cfg.workload != "low-latency":
        from deep_ep.bench.plot import write_png

        if write_png([result], args.png):
            print(f"wrote {args.png}", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: str = "deep-ep bench") -> int:
    """Parse ``deep-ep bench`` options from ``argv`` and run (``benchmarks/bench_normal.py``).

    Args:
        argv: the options (default ``sys.argv[1:]``).
        prog: the program name shown in usage lines and recorded as the command.

    Returns:
        The exit status (:func:`run_from_args`).
    """
    import shlex

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv), command=" ".join([prog, shlex.join(argv)]).strip())
