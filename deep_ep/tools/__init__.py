"""Measurement tools: the investigations behind the performance notes, behind one launcher.

Run one as ``deep-ep tools NAME [ARGS...]`` or ``python -m deep_ep.tools NAME [ARGS...]``
(``--help`` after the name gives its options); ``deep-ep tools`` lists them. They are not benchmarks of
record (``deep-ep bench`` is; docs/bench.md): each prints what an investigation needs on a lent GPU
machine, most on one or two GPUs. Ranks are started and timed with the helpers every benchmark uses
(:mod:`deep_ep.bench.launch`, :mod:`deep_ep.bench.timing`).

==================  ================================================================================  =====================
name                what it measures                                                                  needs
==================  ================================================================================  =====================
``call-profile``    CUDA-event, host and GPU-kernel time of each Buffer call (layout, fresh, worst,   1+ GPUs
                    cached bf16 / fp8, combine) at the normal workload, kernel tables, cProfile
``host-breakdown``  host cost of single launches and of whole device-path calls, their graph-         1 GPU
                    replayed GPU time, cProfile and torch-profiler op counts
``host-overhead``   host time, Python calls and torch ops per Buffer call at tiny shapes              CPU (gloo)
``host-time``       host time per call of the nvlink transport's host path against its fused path      2 GPUs (or shared
                                                                                                      / CPU: a proxy)
``ll-probe``        host profile and kernel times of the low-latency calls                           1 GPU
``moe-profile``     an ExpertParallelMoE training step with 1 and N chunks: host time, cProfile,      1 GPU
                    torch profiler (and a Chrome trace)
``codec-speed``     encode / decode time of the Triton codecs at the normal workload                  1 GPU
``nvlink-probe``    the pieces of an nvlink dispatch on raw symmetric memory (stores into the peer,   2 GPUs
                    local gathers, copy-out, barrier)
``share-gpu``       whether N processes can share one GPU for the multi-rank tests                    1 GPU
``check-ranks``     the conformance scenarios at any number of ranks (under ``torchrun``)             N GPUs, the repo's
                                                                                                      ``tests/``
==================  ================================================================================  =====================

Adding a tool: a module here with ``main(argv, prog) -> int`` and one line in :data:`TOOLS`.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

__all__ = ["TOOLS", "main", "usage"]

#: every tool: name -> (module under deep_ep.tools, what it measures, what it needs)
TOOLS = {
    "call-profile": ("call_profile", "time of each Buffer call: CUDA events, host, GPU kernels, cProfile", "1+ GPUs"),
    "host-breakdown": (
        "host_breakdown",
        "host cost of launches and device-path calls, graph-replayed GPU time",
        "1 GPU",
    ),
    "host-overhead": ("host_overhead", "host time, Python calls, torch ops per Buffer call (tiny shapes)", "CPU"),
    "host-time": (
        "host_time",
        "nvlink host path against fused path: host time, launches, ops per call",
        "2 GPUs / CPU",
    ),
    "ll-probe": ("ll_probe", "host profile and kernel times of the low-latency calls", "1 GPU"),
    "moe-profile": ("moe_profile", "ExpertParallelMoE step with 1 and N chunks: host time and profiles", "1 GPU"),
    "codec-speed": ("codec_speed", "encode / decode time of the Triton codecs at the normal workload", "1 GPU"),
    "nvlink-probe": ("nvlink_probe", "pieces of an nvlink dispatch on raw symmetric memory", "2 GPUs"),
    "share-gpu": ("share_gpu", "can N processes share one GPU for the multi-rank tests", "1 GPU"),
    "check-ranks": ("check_ranks", "conformance scenarios at N ranks (torchrun; the repo's tests/)", "N GPUs"),
}


def usage(prog: str = "python -m deep_ep.tools") -> str:
    """The list of tools, one line each.

    Args:
        prog: how the launcher was called.

    Returns:
        The text.
    """
    lines = [f"usage: {prog} NAME [ARGS...]   ({prog} NAME --help: the tool's options)", "", "tools:"]
    width = max(map(len, TOOLS))
    for name, (_, what, needs) in TOOLS.items():
        lines.append(f"  {name:<{width}}  {what} [{needs}]")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m deep_ep.tools") -> int:
    """Run the tool named by ``argv[0]`` with the rest of ``argv``; without a name list the tools.

    Args:
        argv: ``[NAME, ARGS...]`` (default ``sys.argv[1:]``).
        prog: how the launcher was called (shown in usage lines).

    Returns:
        The tool's exit status; 0 for the listing, 2 for an unknown name.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print(usage(prog))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in TOOLS:
        print(f"{prog}: error: unknown tool {name!r}\n{usage(prog)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__name__}.{TOOLS[name][0]}")
    return int(module.main(rest, prog=f"{prog} {name}") or 0)
