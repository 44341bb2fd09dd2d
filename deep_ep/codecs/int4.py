"""Level 4: int4 values, two per byte, one bf16 scale per 32 values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ._math import (
    BLOCK4,
    INT4_MAX,
    INT_FLOOR,
    bf16_bits,
    bits_bf16,
    blocks,
    dequant_int,
    div,
    finite_abs,
    quant_int,
    scale_bytes,
    u8_to_bytes,
)
from .base import Codec, register

__all__ = ["Int4Codec"]


@register
@dataclass(frozen=True, repr=False)
class Int4Codec(Codec):
    """``nb = ceil(H / 32)`` bf16 scales (``amax / 7``), then int4 values two per byte (low nibble = even
    column), two's complement in ``[-7, 7]`` (-8 reserved for NaN). ``2 nb + ceil(H / 2)`` bytes."""

    level: ClassVar = 4

    @property
    def blocks(self) -> int:
        """``ceil(H / 32)``."""
        return -(-self.hidden // BLOCK4)

    @property
    def row_bytes(self) -> int:
        """``2 nb + ceil(H / 2)``."""
        return 2 * self.blocks + -(-self.hidden // 2)

    @property
    def scale_bytes(self) -> int:
        """``2 nb``."""
        return 2 * self.blocks

    @property
    def header_code(self) -> int:
        """40."""
        return 40

    def encode_reference(self, x: torch.Tensor) -> torch.Tensor:
        """See :meth:`Codec.encode_reference`."""
        self._check(x)
        T, H = x.shape
        if T == 0:
            return self._empty(x)
        b = blocks(x.float(), BLOCK4)
        nb = b.size(1)
        amax = finite_abs(b).amax(dim=2).clamp(min=INT_FLOOR)
        bits = bf16_bits(div(amax, INT4_MAX))
        q = quant_int(b, bits_bf16(bits).unsqueeze(2), INT4_MAX).reshape(T, nb * BLOCK4)[:, :H]
        if H % 2:
            q = torch.nn.functional.pad(q, (0, 1))
        packed = (q[:, 0::2] & 0xF) | ((q[:, 1::2] & 0xF) << 4)
        return torch.cat([scale_bytes(bits), u8_to_bytes(packed)], dim=1)

    def decode_reference(self, packed: torch.Tensor) -> torch.Tensor:
        """See :meth:`Codec.decode_reference`."""
        N, H, nb = packed.size(0), self.hidden, self.blocks
        if N == 0:
            return torch.zeros((0, H), dtype=torch.float32, device=packed.device)
        sb = self.scale_bytes
        head, body = packed[:, :sb], packed[:, sb:]
        bits = head.to(torch.int32).view(N, nb, 2)
        bits = bits[:, :, 0] | (bits[:, :, 1] << 8)
        scale = bits_bf16(bits)
        b = body.to(torch.int32)
        q = torch.stack([b & 0xF, b >> 4], dim=2).reshape(N, 2 * b.size(1))
        q = torch.where(q >= 8, q - 16, q)
        q = torch.nn.functional.pad(q, (0, nb * BLOCK4 - q.size(1))).view(N, nb, BLOCK4)
        return dequant_int(q, scale.unsqueeze(2), INT4_MAX).reshape(N, nb * BLOCK4)[:, :H]

    def _kernel_encode(self, x: torch.Tensor, index: Optional[torch.Tensor], out: torch.Tensor) -> None:
        from ..kernels import quant

        quant.encode_int4(self, x, index, out)

    def _kernel_decode(self, packed: torch.Tensor, out: torch.Tensor) -> None:
        from ..kernels import quant

        quant.decode_int4(self, packed, out)
