"""Shared arithmetic of the codecs (plain torch, any device): blocks, scales, rounding, byte packing.

Every step is exact or correctly rounded, so the Triton kernels (:mod:`deep_ep.kernels.quant`) can
produce the same bytes.
"""

from __future__ import annotations

import torch

__all__ = ["FP8_MAX", "INT4_MAX", "INT8_MAX", "view_rows", "relative_error"]

FP8_MAX = 448.0
INT4_MAX = 7
INT8_MAX = 127
FP8_FLOOR = 1e-4
INT_FLOOR = 1e-30
BLOCK8 = 128
BLOCK4 = 32


def div(a: torch.Tensor, c: float) -> torch.Tensor:
    """``a / c`` correctly rounded on every device (CUDA divides by a Python scalar as a multiplication by
    its reciprocal, which can differ in the last bit; a tensor divisor gives IEEE division)."""
    return a / torch.full_like(a, float(c))


def rdiv(c: float, a: torch.Tensor) -> torch.Tensor:
    """``c / a`` correctly rounded (see :func:`_div`)."""
    return torch.full_like(a, float(c)) / a


def finite_abs(x: torch.Tensor) -> torch.Tensor:
    a = x.abs()
    return torch.where(torch.isfinite(a), a, torch.zeros((), dtype=a.dtype, device=a.device))


def blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[T, H]`` float32 -> ``[T, nb, block]``, zero padded."""
    T, H = x.shape
    nb = -(-H // block)
    if nb * block != H:
        x = torch.nn.functional.pad(x, (0, nb * block - H))
    return x.view(T, nb, block)


def bf16_bits(scale: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16 bit patterns as int32 (0..65535), rounded to nearest even."""
    return scale.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF


def bits_bf16(bits: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns (int) -> float32."""
    b = bits.to(torch.int32)
    b = torch.where(b >= 0x8000, b - 0x10000, b)
    return b.to(torch.int16).view(torch.bfloat16).float()


def quant_int(x: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Round ``x * (1 / scale)`` to ints in ``[-qmax, qmax]``; NaN -> ``-qmax - 1`` (int32)."""
    q = torch.round(x * rdiv(1.0, scale))
    q = torch.where(q > qmax, torch.full_like(q, qmax), q)
    q = torch.where(q < -qmax, torch.full_like(q, -qmax), q)
    return torch.where(torch.isnan(q), torch.full_like(q, -qmax - 1), q).to(torch.int32)


def dequant_int(q: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    v = q.float() * scale
    return torch.where(q == -qmax - 1, torch.full_like(v, float("nan")), v)


def u8_to_bytes(v: torch.Tensor) -> torch.Tensor:
    """Int values 0..255 (or signed, two's complement) -> uint8."""
    return (v.to(torch.int32) & 0xFF).to(torch.uint8)


def view_rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bytes of the rows of ``t`` (``[N, w]``) as ``dtype`` (``[N, w / size]``), copying when the rows
    are not laid out one after another (a single-row slice counts as contiguous with any row stride,
    which ``Tensor.view(dtype)`` rejects)."""
    N = t.size(0)
    if N == 0:
        return torch.empty(
            (0, t.size(1) * t.element_size() // torch.empty((), dtype=dtype).element_size()),
            dtype=dtype,
            device=t.device,
        )
    return t.contiguous().reshape(-1).view(dtype).view(N, -1)


def saturate(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Finite values beyond ``dtype``'s range (float16) clamped to it: a scale rounded up by its bf16
    rounding must not turn a finite input into an infinity. NaN and Inf codes stay as they are."""
    if dtype != torch.float16:
        return v
    m = torch.finfo(torch.float16).max
    v = torch.where(v > m, torch.full_like(v, m), v)
    return torch.where(v < -m, torch.full_like(v, -m), v)


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= ``s`` (positive normal float32), by exponent arithmetic (exact)."""
    bits = s.view(torch.int32)
    e = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (e << 23).view(torch.float32)


def scale_bytes(bits: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns ``[T, nb]`` -> little-endian bytes ``[T, 2 nb]``."""
    return torch.stack([u8_to_bytes(bits & 0xFF), u8_to_bytes(bits >> 8)], dim=2).reshape(
        bits.size(0), 2 * bits.size(1)
    )


def relative_error(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row relative L2 error ``|y - x| / |x|`` (float64, finite entries only; 0 for zero rows)."""
    x64, y64 = x.double(), y.double()
    ok = torch.isfinite(x64) & torch.isfinite(y64)
    d = torch.where(ok, y64 - x64, torch.zeros_like(x64))
    n = torch.where(ok, x64, torch.zeros_like(x64))
    num, den = d.norm(dim=1), n.norm(dim=1)
    return torch.where(den > 0, num / den.clamp(min=1e-300), num)
