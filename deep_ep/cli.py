"""The ``deep-ep`` command line: ``deep-ep info | bench | demo | tools``.

``python -m deep_ep ...`` runs the same thing. The work of ``bench`` and ``demo`` lives in
:mod:`deep_ep.bench`, that of ``tools`` in :mod:`deep_ep.tools`; neither imports this module.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from typing import Optional, Sequence

from deep_ep.bench.environment import machine, versions  # noqa: F401  (deep_ep.cli.versions / machine)
from deep_ep.settings import VARIABLES, env_raw

#: Environment variables shown by ``deep-ep info``: deep_ep's own (:data:`deep_ep.settings.VARIABLES`),
#: then those of NCCL, symmetric memory, CUDA and the launcher that change how it runs.
RELEVANT_ENV = VARIABLES + (
    "NCCL_NVLS_ENABLE",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST",
    "CUDA_VISIBLE_DEVICES",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
)


def _plain(text: str) -> str:
    r"""``text`` (a docstring's reStructuredText) as plain text for ``--help``: ``\`\`x\`\``` and
    ``:role:\`x\``` become ``x``."""
    return re.sub(r"(?::[a-z]+:)?`{1,2}([^`]+)`{1,2}", r"\1", text)


def info_report() -> dict:
    """Everything ``deep-ep info`` shows.

    The backend decision is the library's own (:func:`deep_ep.transport.backend_support`
    and :func:`deep_ep.transport.select_backend`, the rule ``Buffer(backend='auto')``
    follows), evaluated for this machine rather than for a process group.

    Returns:
        A JSON-ready dict: ``versions``, ``machine``, ``topology``, ``backends``, ``auto``, ``env``.
    """
    import socket

    from deep_ep import transport

    auto, why = transport.select_backend(None)
    world, local = env_raw("WORLD_SIZE"), env_raw("LOCAL_WORLD_SIZE")
    per_node = env_raw("DEEP_EP_RANKS_PER_NODE") or local
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
        "env": {k: env_raw(k) for k in RELEVANT_ENV},
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
    """``deep-ep info``: versions, GPUs, peer access, and which backends can run.

    Args:
        args: the parsed options (``--json``).

    Returns:
        The exit status (0).
    """
    rep = info_report()
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        _print_info(rep)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``deep-ep bench``: spawn ranks and run the docs/bench.md benchmark (:mod:`deep_ep.bench`).

    Args:
        args: the parsed options.

    Returns:
        The exit status.
    """
    from deep_ep import bench

    return bench.run_from_args(args, command=args.command_line)


def cmd_demo(args: argparse.Namespace) -> int:
    """``deep-ep demo``: train a small MoE transformer with three communication setups.

    Args:
        args: the parsed options.

    Returns:
        The exit status.
    """
    from deep_ep.bench import demo

    return demo.main_from_args(args)


def cmd_tools(args: argparse.Namespace) -> int:
    """``deep-ep tools [NAME ARGS...]``: list the measurement tools, or run one (:mod:`deep_ep.tools`).

    Args:
        args: the parsed options (``name``, ``args``).

    Returns:
        The tool's exit status.
    """
    from deep_ep import tools

    return tools.main(([args.name] if args.name else []) + list(args.args), prog=f"{args.prog} tools")


def build_parser(prog: str = "deep-ep") -> argparse.ArgumentParser:
    """The argument parser of the ``deep-ep`` command and its subcommands.

    Args:
        prog: the program name shown in usage lines.

    Returns:
        The parser; each subcommand's parser is its namespace's ``parser``.
    """
    from deep_ep.bench import demo
    from deep_ep.bench.options import add_arguments

    parser = argparse.ArgumentParser(prog=prog, description="deep_ep: expert-parallel dispatch/combine for MoE models.")
    sub = parser.add_subparsers(dest="command", metavar="{info,bench,demo,tools}")
    sub.required = True

    p = sub.add_parser(
        "info",
        help="versions, GPUs, peer access, supported backends",
        description="Show what this machine offers deep_ep and which backend backend='auto' picks.",
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_info, parser=p)

    p = sub.add_parser(
        "bench",
        help="benchmark dispatch/combine against the docs/bench.md baselines",
        description="Spawn ranks on this host (all GPUs over NCCL, or 2 CPU ranks "
        "over gloo) and time dispatch/combine as docs/bench.md describes.",
    )
    add_arguments(p)
    p.set_defaults(func=cmd_bench, parser=p)

    p = sub.add_parser(
        "demo",
        help="train a small MoE transformer: collective vs deep_ep vs deep_ep with overlap",
        description=_plain(demo.__doc__.split("\n\n")[0]),
    )
    demo.add_arguments(p)
    p.set_defaults(func=cmd_demo, parser=p)

    p = sub.add_parser(
        "tools",
        help="measurement tools for GPU investigations (list them, or run one: deep-ep tools NAME --help)",
        description="The measurement tools of deep_ep.tools (also python -m deep_ep.tools NAME ...).",
        add_help=False,
    )
    p.add_argument("name", nargs="?", help="the tool; none lists them")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the tool's own arguments")
    p.set_defaults(func=cmd_tools, parser=p, prog=prog)
    return parser


def main(argv: Optional[Sequence[str]] = None, prog: str = "deep-ep") -> int:
    """Entry point of the ``deep-ep`` console script.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
        prog: the program name shown in usage lines.

    Returns:
        The exit status (an unknown option exits 2 with the usage of the subcommand it was given to).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = build_parser(prog).parse_known_args(argv)
    if extra and args.command == "tools":  # e.g. ``deep-ep tools --help``: the tools' own listing
        args.args = extra + list(args.args)
    elif extra:  # report it with the subcommand's usage, not the top level's
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.command_line = " ".join([prog, shlex.join(argv)]).strip()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
