"""Run conformance scenarios at any number of ranks on GPUs (the pytest GPU suite uses 2).

torchrun --nproc-per-node N scripts/check_ranks.py [backend] [scenario ...]
Each scenario is checked against the oracle on every rank (tests/test_conformance.py).
"""

import os
import sys
import zlib

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    from tests.test_conformance import GPU_SCENARIOS, run_scenario

    backend = sys.argv[1] if len(sys.argv) > 1 else "nvlink"
    names = sys.argv[2:] or list(GPU_SCENARIOS)
    for name in names:
        run_scenario(rank, world, backend, zlib.crc32(f"{name}/{world}".encode()), GPU_SCENARIOS[name])
        if rank == 0:
            print(f"{backend} x{world} {name}: ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
