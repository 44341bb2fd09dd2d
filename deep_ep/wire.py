"""What a Buffer puts on the wire: its compression settings, codecs per hidden size, and statistics.

:class:`Wire` turns ``Buffer(compression_level=..., compression_ratio=...,
combine_compression_level=..., compression_stats=...)`` into codecs
(:mod:`deep_ep.compress`): a dispatch of floating rows is encoded once per
token before it is sent and decoded after it arrives (or handed over
encoded, :class:`CompressedRows`); a combine is encoded only when the Buffer
opted into 8 bits. A per-call ``compress`` argument overrides the Buffer's
level (``False`` = 16-bit, e.g. for gradients).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import torch

from .agreement import Problem
from .compress import LEVELS, Codec, make_codec, relative_error, view_rows
from .errors import DeepEPInputError
from .transport import Plan

__all__ = ["Wire", "WireMethods", "CompressedRows", "parse_level"]

Level = Union[int, str]


def parse_level(level: Any, what: str = "compression_level") -> Level:
    """``16 / 8 / 4 / 'auto'`` from an int, a string or ``None`` (16); raise otherwise."""
    if level is None:
        return 16
    if isinstance(level, str):
        s = level.strip().lower()
        if s == "auto":
            return "auto"
        try:
            level = int(s)
        except ValueError:
            raise DeepEPInputError(f"{what} must be one of 16, 8, 4, 'auto'; got {level!r}") from None
    if isinstance(level, bool) or level not in LEVELS:
        raise DeepEPInputError(f"{what} must be one of 16, 8, 4, 'auto'; got {level!r}")
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

    def __init__(self, level: Any, ratio: Optional[float], combine_level: Any, stats: Optional[bool],
                 round_scale: bool = False, use_ue8m0: bool = False) -> None:
        env = os.environ.get("DEEP_EP_COMPRESSION_LEVEL")
        if env and parse_level(level) == 16:
            level = env
        self.level = parse_level(level)
        self.ratio = ratio
        if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
            raise DeepEPInputError(f"compression_ratio must be in (0, 1], got {ratio!r}")
        self.combine_level = parse_level(combine_level, "combine_compression_level")
        if self.combine_level not in (16, 8):
            raise DeepEPInputError(f"combine_compression_level must be 16 or 8, got {combine_level!r}")
        self.stats = bool(stats) if stats is not None else os.environ.get("DEEP_EP_COMPRESSION_STATS", "") not in ("", "0")
        self.round_scale, self.use_ue8m0 = round_scale, use_ue8m0
        self._codecs: Dict[tuple, Codec] = {}
        self.last_stats: Optional[Dict[str, Any]] = None

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
        if codec is None:
            return 16
        if codec.level == "auto":
            return 100000 + codec.upgrades
        return int(codec.level) * 10 + int(codec.round_scale) + 2 * int(codec.use_ue8m0)

    def record(self, codec: Optional[Codec], x: torch.Tensor, remote_rows: Optional[int],
               sent: Optional[torch.Tensor] = None) -> None:
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
        self.last_stats = dict(level=codec.level if codec is not None else 16, row_bytes=row_bytes,
                               bf16_row_bytes=2 * x.size(1),
                               bytes_on_wire=None if remote_rows is None else int(remote_rows) * row_bytes,
                               rel_err_mean=mean, rel_err_max=mx)


class WireMethods:
    """The compression helpers of :class:`deep_ep.Buffer` (a mixin; needs ``_wire``, ``rank``)."""

    def _dispatch_codec(self, compress: Any, xv: torch.Tensor, scales: Optional[torch.Tensor]):
        """The codec of this call's rows (``None``: they travel as they are), or a Problem."""
        try:
            level, ratio = self._wire.call_level(compress)
            if level == 16 or scales is not None or not xv.is_floating_point() or xv.dtype == torch.float64:
                return None        # an fp8 pair is already in its wire format; float64 rows travel exact
            return self._wire.codec(level, xv.size(1), ratio)
        except DeepEPInputError as e:
            raise Problem(7, e) from None

    def _decode(self, codec, packed: torch.Tensor, dtype: torch.dtype, return_compressed: bool):
        if codec is None:
            return packed
        if return_compressed:
            return CompressedRows(codec, packed)
        return codec.decode(packed, dtype)

    def _record_wire(self, codec, xv: torch.Tensor, plan: Plan) -> None:
        if not self._wire.stats:
            return
        m = plan.is_token_in_rank
        if plan.send_counts is not None:
            remote = sum(plan.send_counts) - plan.send_counts[self.rank]
        else:
            remote = int(m.sum()) - int(m[:, self.rank].sum())
        self._wire.record(codec, xv, remote, m.any(dim=1) if codec is not None else None)

    @property
    def last_dispatch_stats(self) -> Optional[Dict[str, Any]]:
        """With ``compression_stats=True`` (env ``DEEP_EP_COMPRESSION_STATS=1``): the last dispatch's
        ``level``, ``row_bytes``, ``bf16_row_bytes``, ``bytes_on_wire`` (rows sent to other ranks x
        ``row_bytes``) and ``rel_err_mean`` / ``rel_err_max`` (relative L2 error of the round trip of every
        row sent to at least one rank; see :meth:`Wire.record`). Costs a host sync per dispatch; ``None``
        when off."""
        return self._wire.last_stats
