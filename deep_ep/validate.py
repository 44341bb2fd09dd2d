"""Validation of the tensors a Buffer call takes, with errors that say what is wrong.

Problems are raised as :class:`~deep_ep.agreement.Problem` so that a collective
call can carry them through the metadata exchange (every rank then raises)
before raising the precise error on the rank whose input was bad.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from . import layout
from .agreement import Problem
from .errors import DeepEPInputError, DeepEPTypeError

__all__ = ["FP8_DTYPES", "FLOAT_DTYPES", "parse_x", "check_device", "check_topk", "check_weights"]

FP8_DTYPES = tuple(d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d)
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_FP8, _FLOAT_X = FP8_DTYPES, FLOAT_DTYPES


def parse_x(x: Any, device: torch.device, what: str = "x") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Validate ``x`` (tensor or fp8 pair); returns contiguous ``(values, scales or None)``."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise Problem(
                1, DeepEPTypeError(f"{what} as a tuple must be (fp8 values, float32 scales), got {len(x)} elements")
            )
        v, s = x
        if not isinstance(v, torch.Tensor) or not isinstance(s, torch.Tensor):
            raise Problem(1, DeepEPTypeError(f"{what} must be (Tensor, Tensor)"))
        if v.dtype not in _FP8:
            raise Problem(1, DeepEPTypeError(f"{what}[0] must be float8_e4m3fn for the fp8 pair, got {v.dtype}"))
        if s.dtype != torch.float32:
            raise Problem(1, DeepEPTypeError(f"{what}[1] (scales) must be float32, got {s.dtype}"))
        if v.dim() != 2:
            raise Problem(1, DeepEPInputError(f"{what}[0] must be 2-D [num_tokens, hidden], got {tuple(v.shape)}"))
        H = v.size(1)
        if H % 128 != 0:
            raise Problem(
                1,
                DeepEPInputError(
                    f"fp8 {what} needs hidden divisible by 128 (one scale per 128 columns), got hidden={H}"
                ),
            )
        if tuple(s.shape) != (v.size(0), H // 128):
            raise Problem(
                1,
                DeepEPInputError(
                    f"{what}[1] (scales) must be [num_tokens, hidden // 128] = [{v.size(0)}, {H // 128}], "
                    f"got {tuple(s.shape)}"
                ),
            )
        check_device(v, device, what)
        check_device(s, device, what + " scales")
        return v.contiguous(), s.contiguous()
    if not isinstance(x, torch.Tensor):
        raise Problem(1, DeepEPTypeError(f"{what} must be a tensor or an (fp8, scales) pair, got {type(x).__name__}"))
    if x.dtype in _FP8:
        raise Problem(1, DeepEPTypeError(f"fp8 {what} must come with its scales: pass (values, scales)"))
    if x.dtype not in _FLOAT_X:
        raise Problem(1, DeepEPTypeError(f"{what} must be bfloat16 (or float16/float32/float64), got {x.dtype}"))
    if x.dim() != 2:
        raise Problem(1, DeepEPInputError(f"{what} must be 2-D [num_tokens, hidden], got shape {tuple(x.shape)}"))
    if x.size(1) == 0:
        raise Problem(1, DeepEPInputError(f"{what} has hidden size 0"))
    check_device(x, device, what)
    return x.contiguous(), None


def check_device(t: torch.Tensor, device: torch.device, what: str, code: int = 1) -> None:
    """Reject a tensor that is not on the Buffer's device (``code``: the argument's error code)."""
    if t.device.type != device.type or (t.is_cuda and t.device.index != device.index):
        raise Problem(code, DeepEPInputError(f"{what} is on {t.device}, this Buffer's group works on {device}"))


def check_topk(topk_idx: torch.Tensor, num_experts: int, T: int, device: torch.device, values: str = "host") -> None:
    """Validate ``topk_idx``: type, dtype, shape, device and, by ``values``, the id range:
    ``'host'`` (read back now) or ``'none'`` (the caller checks it another way: the metadata
    exchange carries every rank's id range)."""
    msg = layout.topk_problem(topk_idx, num_experts, num_tokens=T, check_values=values == "host")
    if msg is not None:
        raise Problem(2, DeepEPTypeError(msg) if "dtype" in msg or "torch.Tensor" in msg else DeepEPInputError(msg))
    check_device(topk_idx, device, "topk_idx", code=2)


def check_weights(
    topk_weights: Optional[torch.Tensor], shape: Tuple[int, int], what: str, device: torch.device
) -> Optional[torch.Tensor]:
    """Validate float32 ``[T, K]`` weights (``None`` passes); returns them contiguous."""
    if topk_weights is None:
        return None
    if not isinstance(topk_weights, torch.Tensor):
        raise Problem(3, DeepEPTypeError(f"{what} must be a tensor"))
    if topk_weights.dtype != torch.float32:
        raise Problem(3, DeepEPTypeError(f"{what} must be float32, got {topk_weights.dtype}"))
    if tuple(topk_weights.shape) != tuple(shape):
        raise Problem(3, DeepEPInputError(f"{what} must have shape {list(shape)}, got {list(topk_weights.shape)}"))
    check_device(topk_weights, device, what, code=3)
    return topk_weights.contiguous()


# ------------------------------------------------------------------ metadata agreement
