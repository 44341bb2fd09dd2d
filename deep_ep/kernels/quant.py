"""Triton kernels of the codecs (:mod:`deep_ep.codecs`): each level's encode / decode, the twin of its
``encode_reference`` / ``decode_reference`` (same bytes, same values), launched by the codec class.

Every step is exact or correctly rounded as in the torch reference: one IEEE
division (``div_rn``) per block for the scale and its inverse, then multiplications, round-half-even (:func:`_rint`, exact in float32), float32 -> fp8 / bf16 casts
that round to nearest even, power-of-two scales by exponent arithmetic, and
``amax`` (order-independent). The int codecs load a block's 32 values
contiguously and split them into 16 even and 16 odd columns (a nibble pair is
one byte); value offsets are separate arguments so that Triton sees their
alignment and moves 16-byte vectors.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _finite_abs(x):
    a = tl.abs(x)
    return tl.where(a < float("inf"), a, 0.0)  # NaN and Inf count as 0


@triton.jit
def _store_u16(ptr, bits, mask):
    tl.store(ptr, (bits & 0xFF).to(tl.uint8), mask=mask)
    tl.store(ptr + 1, ((bits >> 8) & 0xFF).to(tl.uint8), mask=mask)


@triton.jit
def _load_u16(ptr, mask):
    lo = tl.load(ptr, mask=mask, other=0).to(tl.int32)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.int32)
    return lo | (hi << 8)


@triton.jit
def _bf16_scale(amax, qmax: tl.constexpr):
    """``amax / qmax`` rounded to bf16: ``(bits as int32, value as float32)``."""
    s = tl.math.div_rn(amax, qmax * 1.0).to(tl.bfloat16)
    bits = s.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return bits, s.to(tl.float32)


@triton.jit
def _out(v, out_ptr):
    """``v`` cast to the output dtype; float16: finite values beyond its range clamped (as the reference)."""
    dt = out_ptr.dtype.element_ty
    if dt == tl.float16:
        v = tl.where(v > 65504.0, 65504.0, v)
        v = tl.where(v < -65504.0, -65504.0, v)
    return v.to(dt)


@triton.jit
def _rint(x):
    """Round to the nearest integer, ties to even (``torch.round``), from exact float32 steps: ``floor``,
    the fraction ``x - floor(x)`` (exact), and the parity of the floor. NaN and +-Inf stay as they are."""
    r = tl.floor(x)
    d = x - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def _quant(x, inv, qmax: tl.constexpr):
    """Round ``x * inv`` (``inv = 1 / scale``, one division per block) to ints; NaN -> the reserved code."""
    q = _rint(x * inv)
    q = tl.where(q > qmax, qmax * 1.0, q)
    q = tl.where(q < -qmax, -qmax * 1.0, q)
    q = tl.where(q != q, -qmax - 1.0, q)
    return q.to(tl.int32)


@triton.jit
def _dequant(q, scale, qmax: tl.constexpr):
    v = q.to(tl.float32) * scale
    return tl.where(q == -qmax - 1, float("nan"), v)


@triton.jit
def _signed(v, bits: tl.constexpr):
    half: tl.constexpr = 1 << (bits - 1)
    return tl.where(v >= half, v - 2 * half, v)


@triton.jit
def _source_row(idx_ptr, row, GATHER: tl.constexpr):
    """The input row an encode program reads: ``idx[row]`` when gathering, else ``row``."""
    if GATHER:
        return tl.load(idx_ptr + row).to(tl.int64)
    else:
        return row


# ---------------------------------------------------------------------------------------------- level 8
@triton.jit
def fp8_blocks(x, ROUND: tl.constexpr):
    """Blocks ``x`` (float32 ``[BB, 128]``) to DeepEP's fp8: ``(e4m3 bytes as uint8, float32 scale [BB])``,
    ``scale = amax / 448`` (amax floored at 1e-4; ``ROUND``: the next power of two). Shared with the
    low-latency send kernel, so both give the codec's bytes."""
    amax = tl.maximum(tl.max(_finite_abs(x), axis=1), 1e-4)
    scale = tl.math.div_rn(amax, 448.0)
    inv = tl.math.div_rn(448.0, amax)
    if ROUND:
        b = scale.to(tl.int32, bitcast=True)
        e = (b >> 23) + ((b & 0x7FFFFF) != 0).to(tl.int32)
        scale = (e << 23).to(tl.float32, bitcast=True)
        inv = tl.math.div_rn(1.0, scale)
    q = x * inv[:, None]
    q = tl.where(q > 448.0, 448.0, q)
    q = tl.where(q < -448.0, -448.0, q)
    q = tl.where(q != q, float("nan"), q)  # one NaN code, as the reference
    return q.to(tl.float8e4nv).to(tl.uint8, bitcast=True), scale


@triton.jit
def _enc8(
    x_ptr,
    idx_ptr,
    out_ptr,
    H,
    NB,
    W,
    VOFF,
    BB: tl.constexpr,
    ROUND: tl.constexpr,
    UE8M0: tl.constexpr,
    GATHER: tl.constexpr,
):
    # VOFF (bytes of scales before the values) is its own argument so that Triton sees its alignment
    row = tl.program_id(0).to(tl.int64)
    xrow = _source_row(idx_ptr, row, GATHER)
    blk = tl.program_id(1) * BB + tl.arange(0, BB)
    col = blk[:, None] * 128 + tl.arange(0, 128)[None, :]
    bm = blk < NB
    m = bm[:, None] & (col < H)
    x = tl.load(x_ptr + xrow * H + col, mask=m, other=0.0).to(tl.float32)
    qb, scale = fp8_blocks(x, ROUND)
    base = out_ptr + row * W
    if UE8M0:
        tl.store(base + blk, ((scale.to(tl.int32, bitcast=True) >> 23) & 0xFF).to(tl.uint8), mask=bm)
    else:
        sb = scale.to(tl.int32, bitcast=True)
        for i in tl.static_range(4):
            tl.store(base + 4 * blk + i, ((sb >> (8 * i)) & 0xFF).to(tl.uint8), mask=bm)
    tl.store(base + VOFF + col, qb, mask=m)


@triton.jit
def _dec8(p_ptr, out_ptr, H, NB, W, VOFF, BB: tl.constexpr, UE8M0: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1) * BB + tl.arange(0, BB)
    col = blk[:, None] * 128 + tl.arange(0, 128)[None, :]
    bm = blk < NB
    m = bm[:, None] & (col < H)
    base = p_ptr + row * W
    if UE8M0:
        e = tl.load(base + blk, mask=bm, other=127).to(tl.int32)
        scale = (e << 23).to(tl.float32, bitcast=True)
    else:
        sb = tl.load(base + 4 * blk, mask=bm, other=0).to(tl.int32)
        for i in tl.static_range(1, 4):
            sb = sb | (tl.load(base + 4 * blk + i, mask=bm, other=0).to(tl.int32) << (8 * i))
        scale = sb.to(tl.float32, bitcast=True)
    q = tl.load(base + VOFF + col, mask=m, other=0)
    v = q.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale[:, None]
    tl.store(out_ptr + row * H + col, _out(v, out_ptr), mask=m)


# ---------------------------------------------------------------------------------------------- level 4
@triton.jit
def _pairs(x_ptr, row, H, blk, bm):
    """A row's blocks of 32 values, contiguous loads, as (even columns, odd columns) ``[BB, 16]``."""
    col = blk[:, None] * 32 + tl.arange(0, 32)[None, :]
    x = tl.load(x_ptr + row * H + col, mask=bm[:, None] & (col < H), other=0.0).to(tl.float32)
    return tl.split(tl.reshape(x, (x.shape[0], 16, 2)))


@triton.jit
def _store_pairs(out_ptr, row, H, blk, bm, ve, vo):
    col = blk[:, None] * 32 + tl.arange(0, 32)[None, :]
    v = tl.reshape(tl.join(ve, vo), (ve.shape[0], 32))
    tl.store(out_ptr + row * H + col, _out(v, out_ptr), mask=bm[:, None] & (col < H))


@triton.jit
def _enc4(x_ptr, idx_ptr, out_ptr, H, NB, W, VOFF, BB: tl.constexpr, GATHER: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    xrow = _source_row(idx_ptr, row, GATHER)
    blk = tl.program_id(1) * BB + tl.arange(0, BB)
    i = tl.arange(0, 16)
    bm = blk < NB
    xe, xo = _pairs(x_ptr, xrow, H, blk, bm)
    amax = tl.maximum(tl.maximum(tl.max(_finite_abs(xe), axis=1), tl.max(_finite_abs(xo), axis=1)), 1e-30)
    bits, scale = _bf16_scale(amax, 7)
    inv = tl.math.div_rn(1.0, scale)[:, None]
    qe = _quant(xe, inv, 7)
    qo = _quant(xo, inv, 7)
    byte = ((qe & 0xF) | ((qo & 0xF) << 4)).to(tl.uint8)
    base = out_ptr + row * W
    _store_u16(base + 2 * blk, bits, bm)
    pos = blk[:, None] * 16 + i[None, :]
    tl.store(base + VOFF + pos, byte, mask=bm[:, None] & (2 * pos < H))


@triton.jit
def _dec4(p_ptr, out_ptr, H, NB, W, VOFF, BB: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1) * BB + tl.arange(0, BB)
    i = tl.arange(0, 16)
    bm = blk < NB
    base = p_ptr + row * W
    scale = _load_u16(base + 2 * blk, bm).to(tl.int16).to(tl.bfloat16, bitcast=True).to(tl.float32)
    pos = blk[:, None] * 16 + i[None, :]
    byte = tl.load(base + VOFF + pos, mask=bm[:, None] & (2 * pos < H), other=0).to(tl.int32)
    ve = _dequant(_signed(byte & 0xF, 4), scale[:, None], 7)
    vo = _dequant(_signed(byte >> 4, 4), scale[:, None], 7)
    _store_pairs(out_ptr, row, H, blk, bm, ve, vo)


# ---------------------------------------------------------------------------------------------- 'auto'
@triton.jit
def _enc_auto(x_ptr, idx_ptr, out_ptr, H, NB, W, K, NBP: tl.constexpr, GATHER: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    xrow = _source_row(idx_ptr, row, GATHER)
    blk = tl.arange(0, NBP)
    i = tl.arange(0, 16)
    bm = blk < NB
    xe, xo = _pairs(x_ptr, xrow, H, blk, bm)
    amax = tl.maximum(tl.maximum(tl.max(_finite_abs(xe), axis=1), tl.max(_finite_abs(xo), axis=1)), 1e-30)
    # the K blocks of largest amax (ties: lower block first) are int8: one sort of unique keys
    # (amax's bits, monotone for positive floats, then the reversed block index)
    key = amax.to(tl.int32, bitcast=True).to(tl.int64) * 65536 + (65535 - blk)
    key = tl.where(bm, key, -1)
    if K <= 32:  # few upgrades: K max-reductions are cheaper than a sort
        rest = key
        kth = tl.max(rest, axis=0)
        for _ in range(1, K):
            rest = tl.where(rest == kth, -1, rest)
            kth = tl.max(rest, axis=0)
    else:
        ranked = tl.sort(key, 0, descending=True)
        kth = tl.max(tl.where(tl.arange(0, NBP) == K - 1, ranked, -1), axis=0)
    wide = (key >= kth) & bm & (K > 0)
    bits4, s4 = _bf16_scale(amax, 7)
    bits8, s8 = _bf16_scale(amax, 127)
    bits = tl.where(wide, bits8 | 0x8000, bits4)
    size = tl.where(wide, 32, 16)
    size = tl.where(bm, size, 0)
    start = tl.cumsum(size, axis=0) - size
    base = out_ptr + row * W
    _store_u16(base + 2 * blk, bits, bm)
    pay = base + 2 * NB + start[:, None]
    w2 = wide[:, None]
    i4 = tl.math.div_rn(1.0, s4)[:, None]
    q4e = _quant(xe, i4, 7)
    q4o = _quant(xo, i4, 7)
    tl.store(pay + i[None, :], ((q4e & 0xF) | ((q4o & 0xF) << 4)).to(tl.uint8), mask=bm[:, None] & ~w2)
    i8 = tl.math.div_rn(1.0, s8)[:, None]
    q8e = _quant(xe, i8, 127)
    q8o = _quant(xo, i8, 127)
    q8 = tl.reshape(tl.join(q8e, q8o), (NBP, 32))
    j = tl.arange(0, 32)
    tl.store(pay + j[None, :], (q8 & 0xFF).to(tl.uint8), mask=bm[:, None] & w2)


@triton.jit
def _dec_auto(p_ptr, out_ptr, H, NB, W, NBP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.arange(0, NBP)
    i = tl.arange(0, 16)
    bm = blk < NB
    base = p_ptr + row * W
    bits = _load_u16(base + 2 * blk, bm)
    wide = (bits >> 15) == 1
    scale = (bits & 0x7FFF).to(tl.int16).to(tl.bfloat16, bitcast=True).to(tl.float32)
    size = tl.where(wide, 32, 16)
    size = tl.where(bm, size, 0)
    start = tl.cumsum(size, axis=0) - size
    pay = base + 2 * NB + start[:, None]
    w2 = wide[:, None]
    s = scale[:, None]
    b4 = tl.load(pay + i[None, :], mask=bm[:, None] & ~w2, other=0).to(tl.int32)
    v4 = tl.reshape(tl.join(_dequant(_signed(b4 & 0xF, 4), s, 7), _dequant(_signed(b4 >> 4, 4), s, 7)), (NBP, 32))
    j = tl.arange(0, 32)
    b8 = tl.load(pay + j[None, :], mask=bm[:, None] & w2, other=0).to(tl.int32)
    v8 = _dequant(_signed(b8, 8), s, 127)
    v = tl.where(w2, v8, v4)
    col = blk[:, None] * 32 + j[None, :]
    tl.store(out_ptr + row * H + col, _out(v, out_ptr), mask=bm[:, None] & (col < H))


def encode_fp8(codec, x: torch.Tensor, index: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """Level 8 (:class:`~deep_ep.codecs.Fp8Codec`): rows of ``x`` (``[T, H]`` contiguous), or ``x[index]``, into
    ``out`` (``uint8 [N, row_bytes]``, contiguous rows); the same bytes as ``codec.encode_reference``."""
    T, H, nb, W = _rows(x, index), x.size(1), codec.blocks, codec.row_bytes
    bb = 8
    _enc8[(T, triton.cdiv(nb, bb))](
        x,
        index if index is not None else x,
        out,
        H,
        nb,
        W,
        codec.scale_bytes,
        BB=bb,
        ROUND=codec.round_scale,
        UE8M0=codec.use_ue8m0,
        GATHER=index is not None,
        num_warps=4,
    )


def decode_fp8(codec, packed: torch.Tensor, out: torch.Tensor) -> None:
    """Level 8: ``packed`` (``uint8 [N, row_bytes]`` contiguous) into ``out`` (``[N, H]`` contiguous); the same
    values as ``codec.decode_reference`` in ``out.dtype``."""
    N, H, nb, W = packed.size(0), codec.hidden, codec.blocks, codec.row_bytes
    bb = 8
    _dec8[(N, triton.cdiv(nb, bb))](packed, out, H, nb, W, codec.scale_bytes, BB=bb, UE8M0=codec.use_ue8m0, num_warps=4)


def encode_int4(codec, x: torch.Tensor, index: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """Level 4 (:class:`~deep_ep.codecs.Int4Codec`): as :func:`encode_fp8`."""
    T, H, nb, W = _rows(x, index), x.size(1), codec.blocks, codec.row_bytes
    bb = 32
    _enc4[(T, triton.cdiv(nb, bb))](
        x,
        index if index is not None else x,
        out,
        H,
        nb,
        W,
        codec.scale_bytes,
        BB=bb,
        GATHER=index is not None,
        num_warps=4,
    )


def decode_int4(codec, packed: torch.Tensor, out: torch.Tensor) -> None:
    """Level 4: as :func:`decode_fp8`."""
    N, H, nb, W = packed.size(0), codec.hidden, codec.blocks, codec.row_bytes
    bb = 32
    _dec4[(N, triton.cdiv(nb, bb))](packed, out, H, nb, W, codec.scale_bytes, BB=bb, num_warps=4)


def encode_auto(codec, x: torch.Tensor, index: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """Level ``'auto'`` (:class:`~deep_ep.codecs.AutoCodec`): as :func:`encode_fp8`."""
    T, H, nb, W = _rows(x, index), x.size(1), codec.blocks, codec.row_bytes
    _enc_auto[(T,)](
        x,
        index if index is not None else x,
        out,
        H,
        nb,
        W,
        codec.upgrades,
        NBP=max(16, triton.next_power_of_2(nb)),
        GATHER=index is not None,
        num_warps=8,
    )


def decode_auto(codec, packed: torch.Tensor, out: torch.Tensor) -> None:
    """Level ``'auto'``: as :func:`decode_fp8`."""
    N, H, nb, W = packed.size(0), codec.hidden, codec.blocks, codec.row_bytes
    _dec_auto[(N,)](packed, out, H, nb, W, NBP=max(16, triton.next_power_of_2(nb)), num_warps=8)


def _rows(x: torch.Tensor, index: Optional[torch.Tensor]) -> int:
    return index.numel() if index is not None else x.size(0)
