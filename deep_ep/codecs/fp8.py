"""Level 8: DeepEP's fp8 format (e4m3 values, one float32 scale per 128 values, or UE8M0 scale bytes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ._math import BLOCK8, FP8_FLOOR, FP8_MAX, blocks, div, finite_abs, pow2_ceil, rdiv, view_rows
from .base import Codec, register

__all__ = ["Fp8Codec"]


@register
@dataclass(frozen=True, repr=False)
class Fp8Codec(Codec):
    """``nb = ceil(H / 128)`` float32 scales (``max(amax, 1e-4) / 448``; ``round_scale``: rounded up to a
    power of two; ``use_ue8m0``: one byte each, the biased exponent), then ``H`` fp8 e4m3 values
    ``x * (448 / max(amax, 1e-4))``: DeepEP's format and arithmetic. ``4 nb + H`` bytes (``nb + H`` with
    UE8M0)."""

    level: ClassVar = 8

    @property
    def blocks(self) -> int:
        """``ceil(H / 128)``."""
        return -(-self.hidden // BLOCK8)

    @property
    def row_bytes(self) -> int:
        """``scale_bytes + H``."""
        return self.scale_bytes + self.hidden

    @property
    def scale_bytes(self) -> int:
        """``4 nb`` (float32 scales) or ``nb`` (UE8M0)."""
        return self.blocks if self.use_ue8m0 else 4 * self.blocks

    @property
    def header_code(self) -> int:
        """``80 + round_scale + 2 use_ue8m0``."""
        return 80 + int(self.round_scale) + 2 * int(self.use_ue8m0)

    def encode_reference(self, x: torch.Tensor) -> torch.Tensor:
        """See :meth:`Codec.encode_reference`."""
        self._check(x)
        T, H = x.shape
        if T == 0:
            return self._empty(x)
        b = blocks(x.float(), BLOCK8)
        amax = finite_abs(b).amax(dim=2).clamp(min=FP8_FLOOR)
        scale = div(amax, FP8_MAX)
        inv = rdiv(FP8_MAX, amax)
        if self.round_scale or self.use_ue8m0:
            scale = pow2_ceil(scale)
            inv = rdiv(1.0, scale)  # exact: a power of two
        q = b * inv.unsqueeze(2)
        q = torch.where(q > FP8_MAX, torch.full_like(q, FP8_MAX), q)
        q = torch.where(q < -FP8_MAX, torch.full_like(q, -FP8_MAX), q)
        q = torch.where(torch.isnan(q), torch.full_like(q, float("nan")), q)  # one NaN code (0x7f)
        vals = q.to(torch.float8_e4m3fn).view(torch.uint8).reshape(T, q.size(1) * q.size(2))[:, :H]
        if self.use_ue8m0:
            sbytes = (scale.view(torch.int32) >> 23).to(torch.uint8)  # the biased exponent
        else:
            sbytes = scale.contiguous().view(torch.uint8).reshape(T, 4 * scale.size(1))
        return torch.cat([sbytes, vals], dim=1)

    def decode_reference(self, packed: torch.Tensor) -> torch.Tensor:
        """See :meth:`Codec.decode_reference`."""
        N, H, nb = packed.size(0), self.hidden, self.blocks
        if N == 0:
            return torch.zeros((0, H), dtype=torch.float32, device=packed.device)
        sb = self.scale_bytes
        head, body = packed[:, :sb], packed[:, sb:]
        if self.use_ue8m0:
            scale = (head.to(torch.int32) << 23).view(torch.float32)
        else:
            scale = view_rows(head, torch.float32)
        vals = body.contiguous().view(torch.float8_e4m3fn).float()
        vals = torch.nn.functional.pad(vals, (0, nb * BLOCK8 - H)).view(N, nb, BLOCK8)
        return (vals * scale.unsqueeze(2)).reshape(N, nb * BLOCK8)[:, :H]

    def _kernel_encode(self, x: torch.Tensor, index: Optional[torch.Tensor], out: torch.Tensor) -> None:
        from ..kernels import quant

        quant.encode_fp8(self, x, index, out)

    def _kernel_decode(self, packed: torch.Tensor, out: torch.Tensor) -> None:
        from ..kernels import quant

        quant.decode_fp8(self, packed, out)
