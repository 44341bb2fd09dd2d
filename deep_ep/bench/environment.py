"""What this machine offers: versions of the software and the GPUs, for ``deep-ep info`` and for every
result file the benchmarks write (so that ``deep_ep.bench`` does not import the command line)."""

from __future__ import annotations

import importlib
import platform
import sys
from typing import Optional

__all__ = ["import_error", "versions", "machine"]


def import_error(module: str) -> Optional[str]:
    """Whether ``module`` imports.

    Args:
        module: a dotted module name.

    Returns:
        ``None`` if it imports, else a one-line reason.
    """
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install raising anything
        return (f"{type(exc).__name__}: {exc}".splitlines() or ["?"])[0]
    return None


def versions() -> dict:
    """Versions of deep_ep, torch (and its CUDA), triton, Python and the platform.

    Returns:
        ``{"deep_ep", "torch", "torch_cuda", "triton", "python", "platform"}`` (``triton`` ``None`` when
        it does not import).
    """
    import torch

    import deep_ep

    triton_error = import_error("triton")
    return {
        "deep_ep": getattr(deep_ep, "__version__", "unknown"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": None if triton_error else getattr(sys.modules["triton"], "__version__", "unknown"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def machine() -> dict:
    """GPUs, peer access between them, symmetric memory and torch.distributed backends of this host.

    Returns:
        ``{"cuda_available", "device_count", "device_names", "peer_access", "symm_mem_error",
        "triton_error", "dist_backends"}``.
    """
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
        "symm_mem_error": import_error("torch.distributed._symmetric_memory"),
        "triton_error": import_error("triton"),
        "dist_backends": [
            name
            for name, ok in (
                ("gloo", dist.is_available() and dist.is_gloo_available()),
                ("nccl", dist.is_available() and dist.is_nccl_available()),
            )
            if ok
        ],
    }
