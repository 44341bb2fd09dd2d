"""``check-ranks``: the conformance scenarios of ``tests/test_conformance.py`` at any number of ranks.

Run under torchrun from a checkout of the repository (the scenarios live in its ``tests/``), one GPU per
rank over NCCL::

    torchrun --nproc-per-node N -m deep_ep.tools check-ranks [BACKEND] [SCENARIO ...]

Every scenario is checked against the oracle on every rank (the GPU suite runs them at 2, 3 and 4 ranks:
``pytest -m gpu``; this runs them at any N).
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib

import torch
import torch.distributed as dist

from deep_ep.bench.launch import torchrun_rank


def main(argv, prog: str = "deep-ep tools check-ranks") -> int:
    """Run the tool.

    Args:
        argv: its arguments (``--help`` lists them).
        prog: its name in usage lines.

    Returns:
        The exit status (a failed scenario raises on its rank).
    """
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].split(": ", 1)[-1])
    p.add_argument("backend", nargs="?", default="nvlink", help="the transport (default nvlink)")
    p.add_argument("scenarios", nargs="*", help="scenario names (default: every GPU scenario)")
    a = p.parse_args(argv)
    launched = torchrun_rank()
    if launched is None:
        p.error(f"start it with torchrun: torchrun --nproc-per-node N -m deep_ep.tools check-ranks {a.backend}")
    rank, world, local = launched
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isdir(os.path.join(root, "tests")) and root not in sys.path:
        sys.path.insert(0, root)  # the checkout's tests/ (not part of the installed package)
    try:
        from tests.test_conformance import GPU_SCENARIOS, run_scenario
    except ImportError as exc:
        p.error(f"needs the repository's tests/ next to deep_ep/ ({exc})")
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    names = a.scenarios or list(GPU_SCENARIOS)
    for name in names:
        run_scenario(rank, world, a.backend, zlib.crc32(f"{name}/{world}".encode()), GPU_SCENARIOS[name])
        if rank == 0:
            print(f"{a.backend} x{world} {name}: ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0
