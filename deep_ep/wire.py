"""What a Buffer puts on the wire: its compression settings, codecs per hidden size, and statistics.

:class:`Wire` turns ``Buffer(compression_level=..., compression_ratio=...,
combine_compression_level=..., compression_stats=...)`` into codecs
(:mod:`deep_ep.compress`): a dispatch of floating rows is encoded once per
token before it is sent and decoded after it arrives (or handed over
encoded, :class:`CompressedRows`); a combine is encoded only when the Buffer
opted into 8 bits. A per-call ``compress`` argument overrides the Buffer's
level (``False`` = 16-bit, e.g. for gradients).

Tolerance mode (``compression_level='auto', compression_tolerance=tol``, env
``DEEP_EP_COMPRESSION_TOLERANCE``): each dispatch with ``compress=True`` (or
``'auto'``) picks its ``k`` from its rows instead of from a byte target. Each
rank computes :func:`~deep_ep.compress.tolerance_upgrades` of the rows it
sends (to any rank) and the ranks agree on the largest (:meth:`WireMethods.
_agree_upgrades`: one extra metadata-sized all-gather, a host sync, before the
call's metadata exchange); every row then travels with that ``k``, so every
row meets ``tol`` (unless even all-int8 misses it). The metadata header
carries the agreed ``k`` as any ``'auto'`` call's does. Every rank must make
the same call (the same ``compress``, cached or not, ``num_worst_tokens`` or
not): on the host path a rank that skips the exchange raises through the
metadata check, but a rank on the nvlink device path or an unchecked cached
dispatch skips both, and the others then wait out ``timeout_s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import torch

from .agreement import _H_LEVEL, _HEADER, Problem, agree_rows
from .codecs import Codec, levels, make_codec, relative_error, tolerance_upgrades, view_rows
from .errors import DeepEPInputError
from .transport import Plan

__all__ = ["Wire", "CompressedRows", "parse_level", "agree_upgrades", "received_rows", "record_dispatch"]

Level = Union[int, str]

#: header slot of the tolerance exchange carrying a rank's own ``k`` (unused by the metadata header)
_H_UPGRADES = 13
assert _H_UPGRADES < _HEADER


def parse_level(level: Any, what: str = "compression_level") -> Level:
    """A compression level (16 or a registered one: 8, 4, ``'auto'``) from an int, a string or ``None`` (16).

    Raises:
        DeepEPInputError: not a level (the message lists the registered ones).
    """
    names = ", ".join(repr(v) for v in levels())
    if level is None:
        return 16
    if isinstance(level, str):
        s = level.strip().lower()
        named = [v for v in levels() if isinstance(v, str) and v == s]
        if named:
            return named[0]
        try:
            level = int(s)
        except ValueError:
            raise DeepEPInputError(f"{what} must be one of {names}; got {level!r}") from None
    if isinstance(level, bool) or level not in levels():
        raise DeepEPInputError(f"{what} must be one of {names}; got {level!r}")
    return level


@dataclass
class CompressedRows:
    """Received rows left in their wire format (``dispatch(..., return_compressed=True)``).

    ``packed`` is ``uint8 [N, codec.row_bytes]``; :meth:`decode` gives the
    values; for level 8, :meth:`fp8` gives DeepEP's ``(float8_e4m3fn [N, H],
    float32 scales [N, H/128])`` pair (copies)."""

    codec: Codec
    packed: torch.Tensor

    def decode(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The rows' values, ``[N, H]`` of ``dtype``."""
        return self.codec.decode(self.packed, dtype)

    def fp8(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Level-8 rows as DeepEP's fp8 pair ``(float8_e4m3fn [N, H], float32 scales [N, H / 128])`` (views of
        the packed bytes, no copy; other levels and UE8M0 scales raise)."""
        c = self.codec
        if c.level != 8 or c.use_ue8m0:
            raise DeepEPInputError("fp8() needs level 8 with float32 scales")
        sb = c.scale_bytes
        return view_rows(self.packed[:, sb:], torch.float8_e4m3fn), view_rows(self.packed[:, :sb], torch.float32)

    @property
    def shape(self) -> torch.Size:
        """``(N, H)``: the shape of the decoded rows."""
        return torch.Size((self.packed.size(0), self.codec.hidden))


class Wire:
    """A Buffer's wire settings (see the module docstring)."""

    def __init__(
        self,
        level: Any,
        ratio: Optional[float],
        combine_level: Any,
        stats: Optional[bool],
        round_scale: bool = False,
        use_ue8m0: bool = False,
        tolerance: Optional[float] = None,
    ) -> None:
        """Validate a Buffer's compression settings (already resolved from arguments and environment by
        :class:`deep_ep.settings.Settings`).

        Args:
            level: ``compression_level`` (16, 8, 4, ``'auto'``; an int or a string).
            ratio: ``'auto'``'s byte target in (0, 1], or ``None``.
            combine_level: 16 or 8.
            stats: record ``last_stats`` per dispatch.
            round_scale, use_ue8m0: fp8 scale options of level 8.
            tolerance: ``'auto'``'s per-row error bound in (0, 1), or ``None``.
        """
        self.level = parse_level(level)
        self.ratio = ratio
        if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
            raise DeepEPInputError(f"compression_ratio must be in (0, 1], got {ratio!r}")
        if tolerance is not None and ratio is not None:
            raise DeepEPInputError(
                "compression_tolerance and compression_ratio are exclusive: 'auto' takes a "
                "byte target or an error tolerance, not both"
            )
        if tolerance is not None:
            if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
                raise DeepEPInputError(f"compression_tolerance must be in (0, 1), got {tolerance!r}")
            if self.level != "auto":
                raise DeepEPInputError(f"compression_tolerance needs compression_level='auto', got {self.level!r}")
            tolerance = float(tolerance)
        self.tolerance: Optional[float] = tolerance
        self.combine_level = parse_level(combine_level, "combine_compression_level")
        if self.combine_level not in (16, 8):
            raise DeepEPInputError(f"combine_compression_level must be 16 or 8, got {combine_level!r}")
        self.stats = bool(stats)
        self.round_scale, self.use_ue8m0 = round_scale, use_ue8m0
        self._codecs: Dict[tuple, Codec] = {}
        self.last_stats: Optional[Dict[str, Any]] = None

    @classmethod
    def from_settings(cls, settings: Any) -> "Wire":
        """The Wire of a Buffer's :class:`~deep_ep.settings.Settings`."""
        return cls(
            settings.compression_level,
            settings.compression_ratio,
            settings.combine_compression_level,
            settings.compression_stats,
            tolerance=settings.compression_tolerance,
        )

    def call_level(self, compress: Any) -> Tuple[Level, Optional[float]]:
        """``(level, ratio)`` of one call: the Buffer's (``True``), none (``False``), a level, or a float
        in (0, 1): ``'auto'`` at that byte ratio."""
        if compress is True:
            return self.level, self.ratio
        if compress is False:
            return 16, None
        if isinstance(compress, float):
            if not 0 < compress < 1:
                raise DeepEPInputError(f"compress as a byte ratio must be in (0, 1), got {compress!r}")
            return "auto", compress
        return parse_level(compress, "compress"), self.ratio

    def call_tolerance(self, compress: Any) -> Optional[float]:
        """The error tolerance of a dispatch called with ``compress``: the Buffer's ``compression_tolerance``
        when the call uses the Buffer's level (``True``) or ``'auto'``, else ``None``. Depends only on the
        Buffer and ``compress`` (never on the rows), so every rank making the same call decides the same."""
        if self.tolerance is None:
            return None
        if compress is True or (isinstance(compress, str) and compress.strip().lower() == "auto"):
            return self.tolerance
        return None

    def upgrades_codec(self, hidden: int, k: Optional[int] = None) -> Codec:
        """The ``'auto'`` codec with ``k`` upgrades per row (``None``: every block) for rows of ``hidden``."""
        if k is None:
            k = -(-hidden // 32)
        key = ("auto", hidden, "k", k)
        c = self._codecs.get(key)
        if c is None:
            c = self._codecs[key] = make_codec("auto", hidden, upgrades=k)
        return c

    @staticmethod
    def tolerance_code(tol: float) -> int:
        """The header level code of the tolerance exchange: minus the tolerance in units of 1e-9 (readable in
        a mismatch error), never one of :meth:`header_code`'s (all positive)."""
        return -round(float(tol) * 1e9)

    def codec(self, level: Level, hidden: int, ratio: Optional[float] = None) -> Optional[Codec]:
        """The codec of ``level`` for rows of ``hidden`` values (``None`` for 16)."""
        if level == 16:
            return None
        ratio = self.ratio if ratio is None else ratio
        key = (level, hidden, ratio)
        c = self._codecs.get(key)
        if c is None:
            c = self._codecs[key] = make_codec(level, hidden, ratio, self.round_scale, self.use_ue8m0)
        return c

    @staticmethod
    def header_code(codec: Optional[Codec]) -> int:
        """An int that differs between wire formats (travels in the metadata header)."""
        return 16 if codec is None else codec.header_code

    def record(
        self, codec: Optional[Codec], x: torch.Tensor, remote_rows: Optional[int], sent: Optional[torch.Tensor] = None
    ) -> None:
        """Opt-in statistics of one dispatch (a host sync).

        ``bytes_on_wire = remote_rows * row_bytes``: the rows sent to other ranks (a token counts once per
        destination rank, not per expert) times the bytes of one row on the wire (``codec.row_bytes``; the
        row's own bytes without a codec). Top-k ids, weights and fp8 scale columns are not counted.
        ``rel_err_mean`` / ``rel_err_max``: :func:`~deep_ep.compress.relative_error` of
        ``codec.roundtrip(row)`` against the row as given (float64 L2, finite entries), mean and max over
        the rows of ``x`` selected by ``sent`` (bool ``[T]``: the tokens sent to at least one rank, this
        one included, as every receiver gets the round trip; all rows when ``None``); 0.0 without a
        codec or without such rows."""
        if not self.stats:
            return
        row_bytes = codec.row_bytes if codec is not None else x.size(1) * x.element_size()
        if codec is not None and sent is not None:
            x = x[sent.to(device=x.device, dtype=torch.bool)]
        if codec is not None and x.size(0):
            err = relative_error(x, codec.roundtrip(x))
            mean, mx = float(err.mean()), float(err.max())
        else:
            mean = mx = 0.0
        self.last_stats = dict(
            level=codec.level if codec is not None else 16,
            row_bytes=row_bytes,
            bf16_row_bytes=2 * x.size(1),
            bytes_on_wire=None if remote_rows is None else int(remote_rows) * row_bytes,
            rel_err_mean=mean,
            rel_err_max=mx,
        )


def agree_upgrades(
    wire: Wire,
    transport: Any,
    device: torch.device,
    tol: float,
    codec: Optional[Codec],
    xv: Optional[torch.Tensor],
    is_token_in_rank: Optional[torch.Tensor],
    header: list,
    payload: Any,
    problem: Optional[Problem],
    fields,
) -> Optional[Codec]:
    """Tolerance mode: this rank's ``k`` (the largest :func:`~deep_ep.codecs.tolerance_upgrades` of
    the rows it sends; 0 without a codec or with a ``problem``), exchanged with every rank's; returns the
    codec of the largest (``None`` when ``codec`` is). Every rank of a tolerance call makes this
    exchange, whatever its input (a rank with bad input sends 0 and its error code).

    The exchange is :func:`~deep_ep.agreement.agree_rows` of the call's own metadata ``header`` (level:
    :meth:`Wire.tolerance_code`, own ``k`` in a spare slot) and ``payload``, so it has exactly the
    length of the metadata exchange that follows, and reaches the same verdict on every rank: a rank
    with bad input raises its error and the others ``RemoteInputError``; ranks that disagree on the
    shapes, or on the tolerance, raise ``RankMismatchError``. A rank not in tolerance mode for this
    call (other ``compress``, other Buffer settings) is in its metadata exchange meanwhile: same length,
    its level code differs, so it raises ``RankMismatchError`` there and the others here; no rank
    waits for an exchange the others skipped. Cost: this all-gather (a host sync) and the float64 error
    of every sent row (:func:`~deep_ep.codecs.tolerance_upgrades`).

    Args:
        wire: the Buffer's :class:`Wire`; transport, device: where the exchange runs.
        tol: the call's tolerance; codec: the call's ``'auto'`` codec or ``None``.
        xv: the rows ``[T, H]``; is_token_in_rank: bool ``[T, R]`` (rows sent nowhere count 0), or ``None``.
        header, payload, problem, fields: the call's metadata exchange (see :func:`deep_ep.agreement.agree_rows`).

    Returns:
        The ``'auto'`` codec with the agreed ``k``, or ``None``.
    """
    k = 0
    if codec is not None and problem is None and xv.size(0):
        ks = tolerance_upgrades(xv, tol)
        if is_token_in_rank is not None:
            ks = torch.where(is_token_in_rank.any(dim=1).to(ks.device), ks, torch.zeros_like(ks))
        k = int(ks.max())
    h = list(header)
    h[_H_LEVEL] = Wire.tolerance_code(tol)
    h[_H_UPGRADES] = k
    _, rows = agree_rows(transport, device, h, payload, problem, fields, head=_HEADER)
    if codec is None:
        return None
    return wire.upgrades_codec(codec.hidden, max(row[_H_UPGRADES] for row in rows))


def received_rows(codec: Optional[Codec], packed: torch.Tensor, dtype: torch.dtype, return_compressed: bool):
    """What ``recv_x`` is: ``packed`` itself without a codec, else the rows decoded to ``dtype``, or left
    encoded as :class:`CompressedRows` (``return_compressed``)."""
    if codec is None:
        return packed
    if return_compressed:
        return CompressedRows(codec, packed)
    return codec.decode(packed, dtype)


def record_dispatch(wire: Wire, codec: Optional[Codec], xv: torch.Tensor, plan: Plan, rank: int) -> None:
    """:meth:`Wire.record` of one dispatch by ``plan`` (rows sent to other ranks, errors of the rows sent)."""
    if not wire.stats:
        return
    m = plan.is_token_in_rank
    if plan.send_counts is not None:
        remote = sum(plan.send_counts) - plan.send_counts[rank]
    else:
        remote = int(m.sum()) - int(m[:, rank].sum())
    wire.record(codec, xv, remote, m.any(dim=1) if codec is not None else None)
