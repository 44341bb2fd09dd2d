"""Level 16: the rows as bf16, no compression (a Buffer sends level-16 rows without a codec; this class
lets ``make_codec(16, H)`` give the same bytes for tools and tests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ._math import view_rows
from .base import Codec, register

__all__ = ["Bf16Codec"]


@register
@dataclass(frozen=True, repr=False)
class Bf16Codec(Codec):
    """The ``H`` values as bf16 bytes: ``2H`` bytes, no scales."""

    level: ClassVar = 16

    @property
    def blocks(self) -> int:
        """No scale blocks."""
        return 0

    @property
    def row_bytes(self) -> int:
        """``2H``."""
        return 2 * self.hidden

    @property
    def scale_bytes(self) -> int:
        """0."""
        return 0

    @property
    def header_code(self) -> int:
        """16 (as no codec)."""
        return 16

    def encode_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The rows cast to bf16, as bytes."""
        self._check(x)
        return x.to(torch.bfloat16).contiguous().view(torch.uint8)

    def decode_reference(self, packed: torch.Tensor) -> torch.Tensor:
        """The bf16 rows as float32."""
        return view_rows(packed, torch.bfloat16).float()

    def encode(
        self, x: torch.Tensor, index: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """See :meth:`Codec.encode` (no kernel: a cast)."""
        self._check(x)
        got = self.encode_reference(x.index_select(0, index) if index is not None else x)
        if out is None:
            return got
        out.copy_(got)
        return out

    def decode(
        self, packed: torch.Tensor, dtype: torch.dtype = torch.bfloat16, out: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """See :meth:`Codec.decode` (no kernel: a cast)."""
        got = view_rows(packed, torch.bfloat16).to(dtype)
        if out is None:
            return got
        out.copy_(got)
        return out
