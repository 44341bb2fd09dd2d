"""Low-bit wire formats for dispatched rows (``compression_level`` 16 / 8 / 4 / ``'auto'``, API.md 4).

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

This module is the CPU reference (plain torch, any device); on CUDA
:mod:`deep_ep.kernels.quant` produces the same bytes in one Triton kernel
per call (tested against it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .errors import DeepEPInputError, DeepEPTypeError

__all__ = [
    "Codec",
    "make_codec",
    "relative_error",
    "tolerance_upgrades",
    "view_rows",
    "FP8_MAX",
    "INT4_MAX",
    "INT8_MAX",
]

FP8_MAX = 448.0
INT4_MAX = 7
INT8_MAX = 127
_FP8_FLOOR = 1e-4
_INT_FLOOR = 1e-30
_BLOCK8 = 128
_BLOCK4 = 32
LEVELS = (16, 8, 4, "auto")


def _div(a: torch.Tensor, c: float) -> torch.Tensor:
    """``a / c`` correctly rounded on every device (CUDA divides by a Python scalar as a multiplication by
    its reciprocal, which can differ in the last bit; a tensor divisor gives IEEE division)."""
    return a / torch.full_like(a, float(c))


def _rdiv(c: float, a: torch.Tensor) -> torch.Tensor:
    """``c / a`` correctly rounded (see :func:`_div`)."""
    return torch.full_like(a, float(c)) / a


def _finite_abs(x: torch.Tensor) -> torch.Tensor:
    a = x.abs()
    return torch.where(torch.isfinite(a), a, torch.zeros((), dtype=a.dtype, device=a.device))


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[T, H]`` float32 -> ``[T, nb, block]``, zero padded."""
    T, H = x.shape
    nb = -(-H // block)
    if nb * block != H:
        x = torch.nn.functional.pad(x, (0, nb * block - H))
    return x.view(T, nb, block)


def _bf16_bits(scale: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16 bit patterns as int32 (0..65535), rounded to nearest even."""
    return scale.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF


def _bits_bf16(bits: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns (int) -> float32."""
    b = bits.to(torch.int32)
    b = torch.where(b >= 0x8000, b - 0x10000, b)
    return b.to(torch.int16).view(torch.bfloat16).float()


def _quant_int(x: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Round ``x * (1 / scale)`` to ints in ``[-qmax, qmax]``; NaN -> ``-qmax - 1`` (int32)."""
    q = torch.round(x * _rdiv(1.0, scale))
    q = torch.where(q > qmax, torch.full_like(q, qmax), q)
    q = torch.where(q < -qmax, torch.full_like(q, -qmax), q)
    return torch.where(torch.isnan(q), torch.full_like(q, -qmax - 1), q).to(torch.int32)


def _dequant_int(q: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    v = q.float() * scale
    return torch.where(q == -qmax - 1, torch.full_like(v, float("nan")), v)


def _u8_to_bytes(v: torch.Tensor) -> torch.Tensor:
    """Int values 0..255 (or signed, two's complement) -> uint8."""
    return (v.to(torch.int32) & 0xFF).to(torch.uint8)


@dataclass(frozen=True)
class Codec:
    """One wire format (see the module docstring); ``encode`` / ``decode`` whole ``[T, H]`` tensors."""

    level: Union[int, str]
    hidden: int
    ratio: float = 0.3  # 'auto': target bytes relative to bf16
    round_scale: bool = False  # level 8
    use_ue8m0: bool = False  # level 8
    fixed_upgrades: Optional[int] = None  # 'auto': k given (tolerance mode) instead of derived from ratio

    # ------------------------------------------------------------------ sizes
    @property
    def blocks(self) -> int:
        """Scale blocks per row: ``ceil(H / 128)`` at level 8, ``ceil(H / 32)`` otherwise."""
        return -(-self.hidden // (_BLOCK8 if self.level == 8 else _BLOCK4))

    @property
    def upgrades(self) -> int:
        """``'auto'``: int8 blocks per row (``k``), chosen from the byte target ``t = ratio * 2H`` as the module
        docstring says: the most that fit in ``t`` when that width is within 1% of ``t``, else the fewest
        above ``t`` when those are within 1% of it, else the nearest (ties: fewer); between 0 and ``nb``.
        ``fixed_upgrades`` (``make_codec(..., upgrades=k)``) when given."""
        if self.level != "auto":
            return 0
        if self.fixed_upgrades is not None:
            return self.fixed_upgrades
        return _auto_upgrades(self.hidden, self.ratio)

    @property
    def row_bytes(self) -> int:
        """Bytes of one packed row on the wire."""
        H, nb = self.hidden, self.blocks
        if self.level == 16:
            return 2 * H
        if self.level == 8:
            return (nb if self.use_ue8m0 else 4 * nb) + H
        if self.level == 4:
            return 2 * nb + -(-H // 2)
        return 18 * nb + 16 * self.upgrades

    @property
    def scale_bytes(self) -> int:
        """Bytes of the scales at the start of a packed row."""
        if self.level == 8:
            return self.blocks if self.use_ue8m0 else 4 * self.blocks
        return 2 * self.blocks

    # ------------------------------------------------------------------ codec
    def encode(
        self, x: torch.Tensor, index: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``[T, H]`` floating rows (``x[index]`` when ``index`` is given) -> packed ``uint8 [T, row_bytes]``,
        written into ``out`` when given (Triton on CUDA, same bytes)."""
        self._check(x)
        if self.level != 16 and x.is_cuda and _use_kernels(x):
            from .kernels import quant

            return quant.encode(self, x, index, out)
        if index is not None:
            x = x.index_select(0, index)
        got = x.to(torch.bfloat16).contiguous().view(torch.uint8) if self.level == 16 else self.encode_reference(x)
        if out is None:
            return got
        out.copy_(got)
        return out

    def decode(
        self, packed: torch.Tensor, dtype: torch.dtype = torch.bfloat16, out: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Packed rows -> ``[N, H]`` of ``dtype``, written into ``out`` when given (Triton on CUDA, same
        values)."""
        if packed.dim() != 2 or packed.size(1) != self.row_bytes or packed.dtype != torch.uint8:
            raise DeepEPInputError(
                f"packed rows must be uint8 [N, {self.row_bytes}] for {self}, got {packed.dtype} {list(packed.shape)}"
            )
        if self.level != 16 and packed.is_cuda and _use_kernels(packed) and (out is None or out.is_contiguous()):
            from .kernels import quant

            return quant.decode(self, packed, dtype, out)
        if self.level == 16:
            got = view_rows(packed, torch.bfloat16).to(dtype)
        else:
            got = _saturate(self.decode_reference(packed), dtype).to(dtype)
        if out is None:
            return got
        out.copy_(got)
        return out

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """What the receiver of ``x`` gets: ``decode(encode(x))`` in ``x.dtype``."""
        return self.decode(self.encode(x), x.dtype)

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
            raise DeepEPTypeError(
                f"compression needs floating rows [T, H], got "
                f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}"
            )
        if x.size(1) != self.hidden:
            raise DeepEPInputError(f"rows have {x.size(1)} values, the codec was made for hidden={self.hidden}")

    # ------------------------------------------------------------------ torch reference
    def encode_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The CPU reference of :meth:`encode` (plain torch, any device)."""
        self._check(x)
        T, H = x.shape
        if T == 0:
            return torch.empty((0, self.row_bytes), dtype=torch.uint8, device=x.device)
        xf = x.float()
        if self.level == 16:
            return x.to(torch.bfloat16).contiguous().view(torch.uint8)
        if self.level == 8:
            b = _blocks(xf, _BLOCK8)
            amax = _finite_abs(b).amax(dim=2).clamp(min=_FP8_FLOOR)
            scale = _div(amax, FP8_MAX)
            inv = _rdiv(FP8_MAX, amax)
            if self.round_scale or self.use_ue8m0:
                scale = _pow2_ceil(scale)
                inv = _rdiv(1.0, scale)  # exact: a power of two
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
        b = _blocks(xf, _BLOCK4)
        nb = b.size(1)
        amax = _finite_abs(b).amax(dim=2).clamp(min=_INT_FLOOR)
        if self.level == 4:
            bits = _bf16_bits(_div(amax, INT4_MAX))
            q = _quant_int(b, _bits_bf16(bits).unsqueeze(2), INT4_MAX).reshape(T, nb * _BLOCK4)[:, :H]
            if H % 2:
                q = torch.nn.functional.pad(q, (0, 1))
            packed = (q[:, 0::2] & 0xF) | ((q[:, 1::2] & 0xF) << 4)
            return torch.cat([_scale_bytes(bits), _u8_to_bytes(packed)], dim=1)
        # 'auto'
        k = self.upgrades
        order = torch.sort(amax, dim=1, descending=True, stable=True).indices
        wide = torch.zeros((T, nb), dtype=torch.bool, device=x.device)
        if k:
            wide.scatter_(1, order[:, :k], True)
        bits = torch.where(wide, _bf16_bits(_div(amax, INT8_MAX)), _bf16_bits(_div(amax, INT4_MAX)))
        scale = _bits_bf16(bits).unsqueeze(2)
        q4 = _quant_int(b, scale, INT4_MAX)
        q8 = _quant_int(b, scale, INT8_MAX)
        bytes4 = _u8_to_bytes((q4[:, :, 0::2] & 0xF) | ((q4[:, :, 1::2] & 0xF) << 4))  # [T, nb, 16]
        bytes8 = _u8_to_bytes(q8)  # [T, nb, 32]
        size = 16 + 16 * wide.to(torch.int64)
        start = torch.cumsum(size, dim=1) - size  # [T, nb]
        j = torch.arange(32, device=x.device)
        P = 16 * nb + 16 * k
        pos = start.unsqueeze(2) + j  # [T, nb, 32]
        pos = torch.where(wide.unsqueeze(2) | (j < 16), pos, torch.full_like(pos, P))  # int4: 16 bytes
        vals = torch.where(wide.unsqueeze(2), bytes8, torch.nn.functional.pad(bytes4, (0, 16)))
        payload = torch.zeros((T, P + 1), dtype=torch.uint8, device=x.device)
        payload.scatter_(1, pos.reshape(T, nb * 32), vals.reshape(T, nb * 32))
        flag = wide.to(torch.int32) << 15
        return torch.cat([_scale_bytes(bits | flag), payload[:, :P]], dim=1)

    def decode_reference(self, packed: torch.Tensor) -> torch.Tensor:
        """The CPU reference of :meth:`decode` (float32 ``[N, H]``)."""
        N, H, nb = packed.size(0), self.hidden, self.blocks
        if N == 0:
            return torch.zeros((0, H), dtype=torch.float32, device=packed.device)
        sb = self.scale_bytes
        head, body = packed[:, :sb], packed[:, sb:]
        if self.level == 8:
            if self.use_ue8m0:
                scale = (head.to(torch.int32) << 23).view(torch.float32)
            else:
                scale = view_rows(head, torch.float32)
            vals = body.contiguous().view(torch.float8_e4m3fn).float()
            vals = torch.nn.functional.pad(vals, (0, nb * _BLOCK8 - H)).view(N, nb, _BLOCK8)
            return (vals * scale.unsqueeze(2)).reshape(N, nb * _BLOCK8)[:, :H]
        bits = head.to(torch.int32).view(N, nb, 2)
        bits = bits[:, :, 0] | (bits[:, :, 1] << 8)
        if self.level == 4:
            scale = _bits_bf16(bits)
            b = body.to(torch.int32)
            q = torch.stack([b & 0xF, b >> 4], dim=2).reshape(N, 2 * b.size(1))
            q = torch.where(q >= 8, q - 16, q)
            q = torch.nn.functional.pad(q, (0, nb * _BLOCK4 - q.size(1))).view(N, nb, _BLOCK4)
            return _dequant_int(q, scale.unsqueeze(2), INT4_MAX).reshape(N, nb * _BLOCK4)[:, :H]
        wide = (bits >> 15) == 1
        scale = _bits_bf16(bits & 0x7FFF).unsqueeze(2)
        size = 16 + 16 * wide.to(torch.int64)
        start = torch.cumsum(size, dim=1) - size
        j = torch.arange(32, device=packed.device)
        idx = start.unsqueeze(2) + torch.where(wide.unsqueeze(2), j, j // 2)  # [N, nb, 32]
        byte = body.to(torch.int32).gather(1, idx.reshape(N, nb * 32).clamp(max=max(body.size(1) - 1, 0)))
        byte = byte.view(N, nb, 32)
        nib = (byte >> (4 * (j % 2))) & 0xF
        q4 = torch.where(nib >= 8, nib - 16, nib)
        q8 = torch.where(byte >= 128, byte - 256, byte)
        v4 = _dequant_int(q4, scale, INT4_MAX)
        v8 = _dequant_int(q8, scale, INT8_MAX)
        return torch.where(wide.unsqueeze(2), v8, v4).reshape(N, nb * 32)[:, :H]


def _auto_upgrades(hidden: int, ratio: float) -> int:
    """The ``k`` of ``'auto'`` rows for a byte target of ``ratio * 2 * hidden`` (see :attr:`Codec.upgrades`)."""
    nb = -(-hidden // _BLOCK4)
    target = ratio * 2 * hidden
    room = (target - 18 * nb) / 16  # upgrades the target holds (fractional)
    lo = math.floor(room + 1e-9)  # 1e-9: a target that is exactly a width stays that width
    if lo < 0:
        return 0
    if lo >= nb:
        return nb  # every block int8: the widest row there is
    width = lambda k: 18 * nb + 16 * k  # noqa: E731
    tol = 0.01 * target
    if target - width(lo) <= tol:
        return lo  # within the target and within 1% of it
    if width(lo + 1) - target <= tol:
        return lo + 1  # over the target by at most 1%
    return lo if target - width(lo) <= width(lo + 1) - target else lo + 1  # neither: the nearest (<= 8 bytes)


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


def _saturate(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Finite values beyond ``dtype``'s range (float16) clamped to it: a scale rounded up by its bf16
    rounding must not turn a finite input into an infinity. NaN and Inf codes stay as they are."""
    if dtype != torch.float16:
        return v
    m = torch.finfo(torch.float16).max
    v = torch.where(v > m, torch.full_like(v, m), v)
    return torch.where(v < -m, torch.full_like(v, -m), v)


def _pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= ``s`` (positive normal float32), by exponent arithmetic (exact)."""
    bits = s.view(torch.int32)
    e = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (e << 23).view(torch.float32)


def _scale_bytes(bits: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns ``[T, nb]`` -> little-endian bytes ``[T, 2 nb]``."""
    return torch.stack([_u8_to_bytes(bits & 0xFF), _u8_to_bytes(bits >> 8)], dim=2).reshape(
        bits.size(0), 2 * bits.size(1)
    )


def _use_kernels(t: torch.Tensor) -> bool:
    from . import kernels

    return kernels.available(t)


def make_codec(
    level: Union[int, str],
    hidden: int,
    ratio: Optional[float] = None,
    round_scale: bool = False,
    use_ue8m0: bool = False,
    upgrades: Optional[int] = None,
) -> Codec:
    """A :class:`Codec`, validating the arguments (``ratio`` only for ``'auto'``, default 0.3).

    ``upgrades`` (``'auto'`` only, instead of ``ratio``): the number ``k`` of int8 blocks per row, an int in
    ``[0, ceil(hidden / 32)]``; the codec's ``ratio`` is then that width's (``row_bytes / (2 hidden)``)."""
    if level not in LEVELS:
        raise DeepEPInputError(f"compression level must be one of 16, 8, 4, 'auto'; got {level!r}")
    if not isinstance(hidden, int) or hidden < 1:
        raise DeepEPInputError(f"hidden must be a positive int, got {hidden!r}")
    if upgrades is not None:
        nb = -(-hidden // _BLOCK4)
        if level != "auto":
            raise DeepEPInputError(f"upgrades is for level 'auto', got level {level!r}")
        if ratio is not None:
            raise DeepEPInputError("give 'auto' a byte ratio or a number of upgrades, not both")
        if isinstance(upgrades, bool) or not isinstance(upgrades, int) or not 0 <= upgrades <= nb:
            raise DeepEPInputError(f"upgrades must be an int in [0, {nb}] for hidden={hidden}, got {upgrades!r}")
        return Codec(level, hidden, (18 * nb + 16 * upgrades) / (2 * hidden), False, False, upgrades)
    if ratio is None:
        from .settings import Settings

        ratio = Settings.default_compression_ratio()
    if not (0 < ratio <= 1):
        raise DeepEPInputError(f"compression ratio must be in (0, 1], got {ratio!r}")
    codec = Codec(level, hidden, float(ratio), bool(round_scale or use_ue8m0), bool(use_ue8m0))
    if level == "auto":
        floor = 18 * codec.blocks / (2 * hidden)
        if ratio < floor - 1e-9:
            raise DeepEPInputError(
                f"compression ratio {ratio} is below what 'auto' can reach for hidden={hidden} "
                f"(every block at 4 bits: {floor:.4f}); use a ratio >= {floor:.4f}"
            )
    return codec


def tolerance_upgrades(x: torch.Tensor, tol: float, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Per row of ``x`` (floating ``[T, H]``): the fewest ``'auto'`` upgrades ``k_row`` that meet ``tol``.

    ``err_row(k)`` is the error of the row sent with ``k`` upgrades (its ``k`` largest-``amax`` blocks of
    32 values int8, the others int4: the format's own choice and order) and decoded to ``dtype`` (default
    ``x.dtype``, what the receiver gets), measured as :func:`relative_error` does (float64 L2 over the
    entries finite in both, ``|y - x| / |x|``, the absolute error for a zero row). The int4 and int8 error
    of every block comes from the codec's own quantisation code (scales rounded to bf16, round half to
    even, saturation), so the errors are exactly the format's; each ``err_row(k)`` is then a sum over
    blocks, equal to :func:`relative_error` of that round trip up to the float64 rounding of the
    summation order (about 1e-16 relative).

    ``k_row`` is the smallest ``k`` with ``err_row(k') <= tol`` for every ``k' >= k``: the smallest
    ``k`` meeting ``tol`` in the usual case where the error falls with every upgrade; the condition on
    the larger ``k'`` guarantees that any ``k >= k_row`` (a call sends every row with the largest
    ``k_row``) meets it too, which a block whose int4 error happens to be below its int8 error could
    otherwise break. A row that misses ``tol`` even with every block int8 gets ``nb = ceil(H / 32)``.

    Returns int64 ``[T]`` on ``x``'s device (plain torch, vectorised over rows and blocks, in row
    chunks of bounded memory; no host sync).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise DeepEPTypeError(
            f"tolerance_upgrades needs floating rows [T, H], got "
            f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}"
        )
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise DeepEPInputError(f"the tolerance must be in (0, 1), got {tol!r}")
    dtype = x.dtype if dtype is None else dtype
    T, H = x.shape
    nb = -(-H // _BLOCK4)
    out = torch.empty((T,), dtype=torch.int64, device=x.device)
    step = max(1, (1 << 22) // (nb * _BLOCK4))  # rows per chunk: ~4M values at a time
    for a in range(0, T, step):
        out[a : a + step] = _tolerance_rows(x[a : a + step], float(tol), dtype)
    return out


def _tolerance_rows(x: torch.Tensor, tol: float, dtype: torch.dtype) -> torch.Tensor:
    """:func:`tolerance_upgrades` of one chunk of rows."""
    T = x.size(0)
    b = _blocks(x.float(), _BLOCK4)  # [T, nb, 32], as the codec sees it
    nb = b.size(1)
    x64 = _blocks(x.double(), _BLOCK4)  # the rows as given
    amax = _finite_abs(b).amax(dim=2).clamp(min=_INT_FLOOR)
    num, den = [], []  # per block and level: sum d^2, sum x^2
    for qmax in (INT4_MAX, INT8_MAX):
        scale = _bits_bf16(_bf16_bits(_div(amax, qmax))).unsqueeze(2)
        y64 = _saturate(_dequant_int(_quant_int(b, scale, qmax), scale, qmax), dtype).to(dtype).double()
        ok = torch.isfinite(x64) & torch.isfinite(y64)
        zero = torch.zeros((), dtype=torch.float64, device=x.device)
        num.append(torch.where(ok, y64 - x64, zero).square().sum(dim=2))
        den.append(torch.where(ok, x64, zero).square().sum(dim=2))
    order = torch.sort(amax, dim=1, descending=True, stable=True).indices  # the format's upgrade order

    def total(per_level):  # [T, nb + 1]: k = 0..nb upgrades; int4 blocks after the k-th, int8 up to it
        p4, p8 = (v.gather(1, order) for v in per_level)
        z = torch.zeros((T, 1), dtype=torch.float64, device=x.device)
        suffix4 = torch.cat([p4.flip(1).cumsum(1).flip(1), z], dim=1)
        prefix8 = torch.cat([z, p8.cumsum(1)], dim=1)
        return suffix4 + prefix8

    n, d = total(num).sqrt(), total(den).sqrt()
    err = torch.where(d > 0, n / d.clamp(min=1e-300), n)
    k = torch.arange(nb + 1, device=x.device)
    last_bad = torch.where(err > tol, k, torch.full_like(k, -1)).amax(dim=1)  # -1: every k meets tol
    return (last_bad + 1).clamp(max=nb)


def relative_error(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row relative L2 error ``|y - x| / |x|`` (float64, finite entries only; 0 for zero rows)."""
    x64, y64 = x.double(), y.double()
    ok = torch.isfinite(x64) & torch.isfinite(y64)
    d = torch.where(ok, y64 - x64, torch.zeros_like(x64))
    n = torch.where(ok, x64, torch.zeros_like(x64))
    num, den = d.norm(dim=1), n.norm(dim=1)
    return torch.where(den > 0, num / den.clamp(min=1e-300), num)
