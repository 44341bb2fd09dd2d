"""Level ``'auto'``: per block of 32 values int4 or int8, rows of one width at a byte target (or a
per-row error tolerance, :func:`tolerance_upgrades`); see :mod:`deep_ep.compress` for the format."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..errors import DeepEPInputError, DeepEPTypeError
from ._math import (
    BLOCK4,
    INT4_MAX,
    INT8_MAX,
    INT_FLOOR,
    bf16_bits,
    bits_bf16,
    blocks,
    dequant_int,
    div,
    finite_abs,
    quant_int,
    saturate,
    scale_bytes,
    u8_to_bytes,
)
from .base import Codec, register

__all__ = ["AutoCodec", "tolerance_upgrades"]


@register
@dataclass(frozen=True, repr=False)
class AutoCodec(Codec):
    """``nb = ceil(H / 32)`` bf16 scales, then per block 16 bytes of int4 or 32 bytes of int8 (``amax / 127``),
    blocks in order; the sign bit of a block's scale says int8. Each row upgrades the same number ``k`` of
    blocks (its ``k`` largest-``amax`` ones, ties: lower block first): ``18 nb + 16 k`` bytes."""

    level: ClassVar = "auto"

    @classmethod
    def make(cls, hidden, ratio, round_scale, use_ue8m0, upgrades) -> "AutoCodec":
        """``upgrades`` (``k``, instead of ``ratio``) or a byte ``ratio`` at or above the all-int4 width."""
        nb = -(-hidden // BLOCK4)
        if upgrades is not None:
            if ratio is not None:
                raise DeepEPInputError("give 'auto' a byte ratio or a number of upgrades, not both")
            if isinstance(upgrades, bool) or not isinstance(upgrades, int) or not 0 <= upgrades <= nb:
                raise DeepEPInputError(f"upgrades must be an int in [0, {nb}] for hidden={hidden}, got {upgrades!r}")
            return cls(hidden, (18 * nb + 16 * upgrades) / (2 * hidden), False, False, upgrades)
        if ratio is None:
            from ..settings import Settings

            ratio = Settings.default_compression_ratio()
            if not 0 < ratio <= 1:
                raise DeepEPInputError(f"compression ratio must be in (0, 1], got {ratio!r}")
        floor = 18 * nb / (2 * hidden)
        if ratio < floor - 1e-9:
            raise DeepEPInputError(
                f"compression ratio {ratio} is below what 'auto' can reach for hidden={hidden} "
                f"(every block at 4 bits: {floor:.4f}); use a ratio >= {floor:.4f}"
            )
        return cls(hidden, float(ratio), bool(round_scale or use_ue8m0), bool(use_ue8m0))

    @property
    def blocks(self) -> int:
        """``ceil(H / 32)``."""
        return -(-self.hidden // BLOCK4)

    @property
    def upgrades(self) -> int:
        """int8 blocks per row (``k``), chosen from the byte target ``t = ratio * 2H``: the most that fit in
        ``t`` when that width is within 1% of ``t``, else the fewest above ``t`` when those are within 1%
        of it, else the nearest (ties: fewer); between 0 and ``nb``. ``fixed_upgrades`` when given."""
        if self.fixed_upgrades is not None:
            return self.fixed_upgrades
        return _auto_upgrades(self.hidden, self.ratio)

    @property
    def row_bytes(self) -> int:
        """``18 nb + 16 k``."""
        return 18 * self.blocks + 16 * self.upgrades

    @property
    def scale_bytes(self) -> int:
        """``2 nb``."""
        return 2 * self.blocks

    @property
    def header_code(self) -> int:
        """``100000 + k``."""
        return 100000 + self.upgrades

    def encode_reference(self, x: torch.Tensor) -> torch.Tensor:
        """See :meth:`Codec.encode_reference`."""
        self._check(x)
        T, H = x.shape
        if T == 0:
            return self._empty(x)
        b = blocks(x.float(), BLOCK4)
        nb = b.size(1)
        amax = finite_abs(b).amax(dim=2).clamp(min=INT_FLOOR)
        k = self.upgrades
        order = torch.sort(amax, dim=1, descending=True, stable=True).indices
        wide = torch.zeros((T, nb), dtype=torch.bool, device=x.device)
        if k:
            wide.scatter_(1, order[:, :k], True)
        bits = torch.where(wide, bf16_bits(div(amax, INT8_MAX)), bf16_bits(div(amax, INT4_MAX)))
        scale = bits_bf16(bits).unsqueeze(2)
        q4 = quant_int(b, scale, INT4_MAX)
        q8 = quant_int(b, scale, INT8_MAX)
        bytes4 = u8_to_bytes((q4[:, :, 0::2] & 0xF) | ((q4[:, :, 1::2] & 0xF) << 4))  # [T, nb, 16]
        bytes8 = u8_to_bytes(q8)  # [T, nb, 32]
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
        return torch.cat([scale_bytes(bits | flag), payload[:, :P]], dim=1)

    def decode_reference(self, packed: torch.Tensor) -> torch.Tensor:
        """See :meth:`Codec.decode_reference`."""
        N, H, nb = packed.size(0), self.hidden, self.blocks
        if N == 0:
            return torch.zeros((0, H), dtype=torch.float32, device=packed.device)
        sb = self.scale_bytes
        head, body = packed[:, :sb], packed[:, sb:]
        bits = head.to(torch.int32).view(N, nb, 2)
        bits = bits[:, :, 0] | (bits[:, :, 1] << 8)
        wide = (bits >> 15) == 1
        scale = bits_bf16(bits & 0x7FFF).unsqueeze(2)
        size = 16 + 16 * wide.to(torch.int64)
        start = torch.cumsum(size, dim=1) - size
        j = torch.arange(32, device=packed.device)
        idx = start.unsqueeze(2) + torch.where(wide.unsqueeze(2), j, j // 2)  # [N, nb, 32]
        byte = body.to(torch.int32).gather(1, idx.reshape(N, nb * 32).clamp(max=max(body.size(1) - 1, 0)))
        byte = byte.view(N, nb, 32)
        nib = (byte >> (4 * (j % 2))) & 0xF
        q4 = torch.where(nib >= 8, nib - 16, nib)
        q8 = torch.where(byte >= 128, byte - 256, byte)
        v4 = dequant_int(q4, scale, INT4_MAX)
        v8 = dequant_int(q8, scale, INT8_MAX)
        return torch.where(wide.unsqueeze(2), v8, v4).reshape(N, nb * 32)[:, :H]

    def _kernel_encode(self, x: torch.Tensor, index: Optional[torch.Tensor], out: torch.Tensor) -> None:
        from ..kernels import quant

        quant.encode_auto(self, x, index, out)

    def _kernel_decode(self, packed: torch.Tensor, out: torch.Tensor) -> None:
        from ..kernels import quant

        quant.decode_auto(self, packed, out)


def _auto_upgrades(hidden: int, ratio: float) -> int:
    """The ``k`` of ``'auto'`` rows for a byte target of ``ratio * 2 * hidden`` (see :attr:`Codec.upgrades`)."""
    nb = -(-hidden // BLOCK4)
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
    nb = -(-H // BLOCK4)
    out = torch.empty((T,), dtype=torch.int64, device=x.device)
    step = max(1, (1 << 22) // (nb * BLOCK4))  # rows per chunk: ~4M values at a time
    for a in range(0, T, step):
        out[a : a + step] = _tolerance_rows(x[a : a + step], float(tol), dtype)
    return out


def _tolerance_rows(x: torch.Tensor, tol: float, dtype: torch.dtype) -> torch.Tensor:
    """:func:`tolerance_upgrades` of one chunk of rows."""
    T = x.size(0)
    b = blocks(x.float(), BLOCK4)  # [T, nb, 32], as the codec sees it
    nb = b.size(1)
    x64 = blocks(x.double(), BLOCK4)  # the rows as given
    amax = finite_abs(b).amax(dim=2).clamp(min=INT_FLOOR)
    num, den = [], []  # per block and level: sum d^2, sum x^2
    for qmax in (INT4_MAX, INT8_MAX):
        scale = bits_bf16(bf16_bits(div(amax, qmax))).unsqueeze(2)
        y64 = saturate(dequant_int(quant_int(b, scale, qmax), scale, qmax), dtype).to(dtype).double()
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
