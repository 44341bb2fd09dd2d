"""The ``deep-ep`` command line: ``deep-ep info | bench | demo``.

``python -m deep_ep ...`` runs the same thing. Heavy modules (the core, the
benchmark) are imported only by the subcommand that needs them, so ``info``
works on a machine where the rest of the package cannot run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shlex
import sys
from typing import Optional, Sequence

#: Environment variables that change how deep_ep or its transports behave.
RELEVANT_ENV = (
    "DEEP_EP_BUFFER_SIZE",
    "DEEP_EP_COMPRESSION_LEVEL",
    "DEEP_EP_COMPRESSION_RATIO",
    "DEEP_EP_TOPOLOGY_AWARE",
    "DEEP_EP_RANKS_PER_NODE",
    "DEEP_EP_TIMEOUT_S",
    "DEEP_EP_CHECK",
    "DEEP_EP_DISABLE_TRITON",
    "DEEP_EP_NVLINK_CHUNKS",
    "DEEP_EP_NVLINK_PULL",
    "DEEP_EP_NVLINK_DISPATCH",
    "DEEP_EP_NVLINK_PUSH_CHUNKS",
    "NCCL_NVLS_ENABLE",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST",
    "CUDA_VISIBLE_DEVICES",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
)


def _import_error(module: str) -> Optional[str]:
    """``None`` if ``module`` imports, else a one-line reason."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install raising anything
        return (f"{type(exc).__name__}: {exc}".splitlines() or ["?"])[0]
    return None


def versions() -> dict:
    """Versions of deep_ep, torch (and its CUDA), triton (None if absent), Python, the platform."""
    import torch

    import deep_ep

    triton_error = _import_error("triton")
    return {
        "deep_ep": getattr(deep_ep, "__version__", "unknown"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": None if triton_error else getattr(sys.modules["triton"], "__version__", "unknown"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def machine() -> dict:
    """GPUs, peer access between them, symmetric memory and torch.distributed backends of this host."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    return {
        "cuda_available": cuda,
        "device_count": count,
        "device_names": [torch.cuda.get_device_name(i) for i in range(count)],
        "peer_access": [
            [i == j or bool(torch.cuda.can_device_access_peer(i, j)) for j in range(count)] for i in range(count)
        ],
        "symm_mem_error": _import_error("torch.distributed._symmetric_memory"),
        "triton_error": _import_error("triton"),
        "dist_backends": [
            name
            for name, ok in (
                ("gloo", dist.is_available() and dist.is_gloo_available()),
                ("nccl", dist.is_available() and dist.is_nccl_available()),
            )
            if ok
        ],
    }


def info_report() -> dict:
    """Everything ``deep-ep info`` shows, as a JSON-ready dict.

    The backend decision is the library's own (:func:`deep_ep.transport.backend_support`
    and :func:`deep_ep.transport.select_backend`, the rule ``Buffer(backend='auto')``
    follows), evaluated for this machine rather than for a process group.
    """
    import socket

    from deep_ep import transport

    auto, why = transport.select_backend(None)
    world, local = os.environ.get("WORLD_SIZE"), os.environ.get("LOCAL_WORLD_SIZE")
    per_node = os.environ.get("DEEP_EP_RANKS_PER_NODE") or local
    topo = {
        "hostname": socket.gethostname(),
        "ranks_per_node": int(per_node) if per_node else None,
        "nodes": (int(world) // int(per_node)) if world and per_node and int(per_node) else None,
    }
    if topo["nodes"] and topo["nodes"] > 1:
        topo["note"] = (
            "the job spans several nodes: backend='auto' takes 'hierarchical' (one copy of a token "
            "per node across nodes) unless DEEP_EP_TOPOLOGY_AWARE=0"
        )
    return {
        "versions": versions(),
        "machine": machine(),
        "topology": topo,
        "backends": {name: {"supported": ok, "reason": reason} for name, ok, reason in transport.backend_support(None)},
        "auto": {"backend": auto, "reason": why},
        "env": {k: os.environ.get(k) for k in RELEVANT_ENV},
    }


def _print_info(rep: dict) -> None:
    """Print the ``deep-ep info`` report for people."""
    v, m = rep["versions"], rep["machine"]
    print("versions")
    for key in ("deep_ep", "torch", "torch_cuda", "triton", "python", "platform"):
        print(f"  {key:<10} {v[key] if v[key] is not None else 'none'}")
    print("machine")
    print(f"  cuda                    {'available' if m['cuda_available'] else 'not available'}")
    print(f"  gpus                    {m['device_count']}")
    for i, name in enumerate(m["device_names"]):
        print(f"    cuda:{i:<3} {name}")
    if m["device_count"] > 1:
        print("  peer access (row can access column)")
        print("           " + " ".join(f"{j:>4}" for j in range(m["device_count"])))
        for i, row in enumerate(m["peer_access"]):
            print(f"    cuda:{i:<3}" + " ".join(f"{'yes' if ok else 'no':>4}" for ok in row))
    sm = "yes" if m["symm_mem_error"] is None else f"no ({m['symm_mem_error']})"
    print(f"  torch symmetric memory  {sm}")
    print(f"  torch.distributed       {', '.join(m['dist_backends']) or 'none'}")
    t = rep.get("topology", {})
    print("topology")
    print(f"  hostname                {t.get('hostname')}")
    if t.get("ranks_per_node"):
        print(
            f"  ranks per node          {t['ranks_per_node']} (from DEEP_EP_RANKS_PER_NODE or torchrun's "
            f"LOCAL_WORLD_SIZE)"
        )
    if t.get("nodes"):
        print(f"  nodes                   {t['nodes']}")
    if t.get("note"):
        print(f"  {t['note']}")
    if not t.get("ranks_per_node"):
        print(
            "  (run under torchrun, or set DEEP_EP_RANKS_PER_NODE, to see the node layout; a Buffer finds it "
            "from the hostnames of its ranks)"
        )
    print("deep_ep backends")
    for name, b in rep["backends"].items():
        print(f"  {name:<13} {'yes' if b['supported'] else 'no':<4} {b['reason']}")
    print(f"  auto -> {rep['auto']['backend']} ({rep['auto']['reason']})")
    env = {k: val for k, val in rep["env"].items() if val is not None}
    if env:
        print("environment")
        for k, val in env.items():
            print(f"  {k}={val}")


def cmd_info(args: argparse.Namespace) -> int:
    """``deep-ep info``: versions, GPUs, peer access, and which backends can run."""
    rep = info_report()
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        _print_info(rep)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``deep-ep bench``: spawn ranks and run the BENCH.md normal-mode benchmark."""
    from deep_ep import bench

    return bench.run_from_args(args, command=args.command_line)


def cmd_demo(args: argparse.Namespace) -> int:
    """``deep-ep demo``: train a small MoE transformer with three communication setups (deep_ep/bench/demo.py)."""
    from deep_ep.bench import demo

    return demo.main_from_args(args)


def build_parser(prog: str = "deep-ep") -> argparse.ArgumentParser:
    """The argument parser of the ``deep-ep`` command and its subcommands."""
    from deep_ep.bench.options import add_arguments

    parser = argparse.ArgumentParser(prog=prog, description="deep_ep: expert-parallel dispatch/combine for MoE models.")
    sub = parser.add_subparsers(dest="command", metavar="{info,bench,demo}")
    sub.required = True

    p = sub.add_parser(
        "info",
        help="versions, GPUs, peer access, supported backends",
        description="Show what this machine offers deep_ep and which backend backend='auto' picks.",
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "bench",
        help="benchmark dispatch/combine against the BENCH.md baselines",
        description="Spawn ranks on this host (all GPUs over NCCL, or 2 CPU ranks "
        "over gloo) and time dispatch/combine per BENCH.md.",
    )
    add_arguments(p)
    p.set_defaults(func=cmd_bench)

    from deep_ep.bench import demo

    p = sub.add_parser(
        "demo",
        help="train a small MoE transformer: collective vs deep_ep vs deep_ep with overlap",
        description=demo.__doc__.split("\n\n")[0],
    )
    demo.add_arguments(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None, prog: str = "deep-ep") -> int:
    """Entry point of the ``deep-ep`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    args.command_line = " ".join([prog, shlex.join(argv)]).strip()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
