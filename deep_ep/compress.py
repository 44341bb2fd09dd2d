"""Low-bit wire formats for dispatched rows (``compression_level`` 16 / 8 / 4 / ``'auto'``, docs/api.md, Compression).

Every level turns a row of ``H`` values into one fixed-width byte row (so any
transport moves it as it moves any row), scales first:

=========  ====================================================================  ==========================
level      packed row (uint8)                                                    bytes per row
=========  ====================================================================  ==========================
16         the bf16 row itself (no codec)                                        ``2H``
8          ``nb = ceil(H/128)`` float32 scales, then ``H`` fp8 e4m3 values;      ``4*nb + H``
           ``scale = max(amax, 1e-4) / 448`` per 128 values, values
           ``x * (448 / max(amax, 1e-4))`` (DeepEP's format and arithmetic);
           ``round_scale``: scale rounded up to a power of two; ``use_ue8m0``
           (implies it): one byte per scale, its biased exponent (UE8M0)        ``nb + H``
4          ``nb = ceil(H/32)`` bf16 scales (``amax / 7``), then int4 values     ``2*nb + ceil(H/2)``
           two per byte (low nibble = even column), two's complement in
           ``[-7, 7]``
``'auto'`` ``nb = ceil(H/32)`` bf16 scales, then per block of 32 values 16      ``18*nb + 16*k``
           bytes of int4 or 32 bytes of int8 (``amax / 127``, ``[-127, 127]``),
           blocks in order; the sign bit of a block's scale says int8. Each
           row upgrades the same number ``k`` of blocks, the ``k`` with the
           largest ``amax`` (ties: lower block first), so that rows have one
           width; ``k`` comes from the byte target (below)
=========  ====================================================================  ==========================

The ``'auto'`` byte target is ``t = ratio * 2H`` bytes per row. Widths come in
steps of 16 bytes (one block upgraded), so ``k`` is: the most upgrades that fit
in ``t`` when that width is within 1% of ``t``; otherwise the fewest above ``t``
when that width is within 1% of it; otherwise the width nearest ``t`` (ties:
the smaller). Guarantee, for ``18*nb <= t <= 34*nb`` (``make_codec`` refuses
``t < 18*nb``; above ``34*nb`` every block is int8 and the row is ``34*nb``):
``|row_bytes - t| <= max(0.01 * t, 8)`` -- within 1% or within half a block
step, whichever is larger -- and ``row_bytes <= t`` whenever a width within 1%
below ``t`` exists. Half a step is at most 1% once ``t >= 800`` bytes, so every
accepted ratio is met within 1% for ``H >= 1409`` (``18*nb >= 800``); at
``H = 1024`` (a step is 16 / 614.4 = 2.6% of a 0.3 target) ratios below 0.39
can miss by up to 8 bytes (0.3: 608 bytes, 1.04% under).

Tolerance mode (``make_codec(..., upgrades=k)``, chosen by
:func:`tolerance_upgrades`): ``k`` is given instead of derived from a byte
target; the format and the bytes are those of any ``'auto'`` codec with that
``k``. :func:`tolerance_upgrades` gives per row the fewest upgrades (same
order: largest ``amax`` first) that bring its relative L2 error under a
tolerance; a Buffer with ``compression_tolerance`` agrees on the largest of
them over every rank (:mod:`deep_ep.wire`).

At level 4's bytes (``18*nb`` when 32 divides ``H``) ``'auto'`` has no byte to
spend on an upgrade: ``k = 0`` and its rows are level 4's, byte for byte, with
the same error. (When the last block holds 30 values or fewer, level 4 packs
it tighter than ``'auto'`` can, and ``'auto'`` cannot reach level 4's bytes.)

Choosing the largest-``amax`` blocks minimises the row's squared error under
the usual uniform-noise model (a block's error is proportional to its
``amax**2``, (127/7)^2 = 329x smaller in int8 than int4) and is exact (no float sums
whose order could differ between implementations). The level of every block
travels in its scale's sign bit: the row header costs no bytes.

The int codecs quantise ``x * (1 / scale)`` (one division per block, then
multiplications, as DeepEP's fp8 cast does), rounding half to even.

Special values: ``amax`` is taken over finite values. NaN stays NaN (fp8 NaN;
the int codes -8 / -128 are reserved for it). +-Inf saturates to the largest
code (+-448 * scale, +-7 or +-127 * scale). Level 8 floors ``amax`` at 1e-4
(DeepEP), so rows far smaller than that lose their digits; levels 4 and
``'auto'`` floor it at 1e-30.

The codecs live in :mod:`deep_ep.codecs` (one class per level, registered; each holds its size math,
its torch reference and the launch of its Triton kernels in :mod:`deep_ep.kernels.quant`, which
produce the same bytes on CUDA, tested against the reference). This module keeps the names users
import (``make_codec``, ``relative_error``, ``tolerance_upgrades``, ...).
"""

from __future__ import annotations

from .codecs import (
    FP8_MAX,
    INT4_MAX,
    INT8_MAX,
    AutoCodec,
    Codec,
    Fp8Codec,
    Int4Codec,
    levels,
    make_codec,
    relative_error,
    tolerance_upgrades,
    view_rows,
)

__all__ = [
    "Codec",
    "Fp8Codec",
    "Int4Codec",
    "AutoCodec",
    "make_codec",
    "relative_error",
    "tolerance_upgrades",
    "view_rows",
    "LEVELS",
    "FP8_MAX",
    "INT4_MAX",
    "INT8_MAX",
]

#: every compression level (16 = no codec, then the registered ones)
LEVELS = levels()
