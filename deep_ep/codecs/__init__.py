"""Wire codecs of dispatched rows: one :class:`Codec` subclass per compression level, in a registry.

Levels: 16 (:class:`Bf16Codec`; a Buffer sends level-16 rows without a codec), 8 (:class:`Fp8Codec`), 4
(:class:`Int4Codec`), ``'auto'`` (:class:`AutoCodec`).
The format of each is documented in :mod:`deep_ep.compress` and in its class. Adding a level is one
class here (decorated with :func:`register`) and its Triton kernels in :mod:`deep_ep.kernels.quant`
(see ``docs/design.md``, "Adding a compression level").
"""

from __future__ import annotations

from ._math import FP8_MAX, INT4_MAX, INT8_MAX, relative_error, view_rows
from .auto import AutoCodec, tolerance_upgrades
from .base import Codec, levels, make_codec, register, registry
from .bf16 import Bf16Codec
from .fp8 import Fp8Codec
from .int4 import Int4Codec

__all__ = [
    "Codec",
    "Bf16Codec",
    "Fp8Codec",
    "Int4Codec",
    "AutoCodec",
    "register",
    "registry",
    "levels",
    "make_codec",
    "tolerance_upgrades",
    "relative_error",
    "view_rows",
    "FP8_MAX",
    "INT4_MAX",
    "INT8_MAX",
]
