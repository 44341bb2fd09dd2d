"""Triton kernels, each behind the torch path it speeds up (imported only where CUDA and Triton exist).

:func:`available` says whether kernels can be used; ``DEEP_EP_DISABLE_TRITON=1``
forces the torch paths (kernels are tested against them).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from ..settings import env_key, env_values, kernels_on_cpu, triton_disabled


@functools.cache
def _triton_importable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401

        return True
    except Exception:  # pragma: no cover - broken install
        return False


def available(t: torch.Tensor) -> bool:
    """Whether a Triton kernel may run on tensor ``t`` (CUDA, Triton importable, not disabled)."""
    return available_on(t.device)


def available_on(device: torch.device) -> bool:
    """Whether Triton kernels may run on ``device``: CUDA (or CPU under Triton's interpreter with
    ``DEEP_EP_KERNELS_ON_CPU=1``), Triton importable, not disabled (``DEEP_EP_DISABLE_TRITON``). The settings
    are read at every call (tests flip them); the answer is cached per device type and their values."""
    key = (device.type, env_values(_SWITCHES))
    got = _AVAILABLE.get(key)
    if got is None:
        got = _AVAILABLE[key] = _available_on(device)
    return got


#: available_on's answers, by (device type, the settings' raw values)
_AVAILABLE: dict = {}
_SWITCHES = env_key(("DEEP_EP_DISABLE_TRITON", "DEEP_EP_KERNELS_ON_CPU", "TRITON_INTERPRET"))


def _available_on(device: torch.device) -> bool:
    if triton_disabled():
        return False
    if device.type != "cuda" and not (device.type == "cpu" and kernels_on_cpu()):
        return False
    if not _triton_importable():
        return False
    if device.type == "cpu":
        from .interpreter import install

        install()  # the interpreter's fixes (idempotent)
    return True
