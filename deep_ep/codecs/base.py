"""The codec interface and the registry of compression levels.

A level is one :class:`Codec` subclass registered under its name (:func:`register`): it holds its
size math (``blocks``, ``row_bytes``, ``scale_bytes``), its torch reference
(``encode_reference`` / ``decode_reference``), the launch of its Triton kernels
(``_kernel_encode`` / ``_kernel_decode``, kernels in :mod:`deep_ep.kernels.quant`) and its code in
the metadata header (:attr:`Codec.header_code`). :func:`make_codec`, the Buffer's settings, the CLI
choices and the wire all read the registry, so adding a level is one class (and its kernels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Tuple, Type, Union

import torch

from ..errors import DeepEPInputError, DeepEPTypeError
from ._math import saturate, view_rows

__all__ = ["Codec", "register", "registry", "make_codec", "levels"]

Level = Union[int, str]

_REGISTRY: Dict[Level, Type["Codec"]] = {}


def register(cls: Type["Codec"]) -> Type["Codec"]:
    """Class decorator: make ``cls`` the codec of level ``cls.level`` (``make_codec``, ``compression_level``,
    the CLI's ``--compression`` choices)."""
    _REGISTRY[cls.level] = cls
    return cls


def registry() -> Dict[Level, Type["Codec"]]:
    """Every registered level and its codec class (a copy)."""
    return dict(_REGISTRY)


def levels() -> Tuple[Level, ...]:
    """Every compression level a Buffer accepts: 16 (no codec), then the registered ones (bit widths from the
    widest, then the named ones such as ``'auto'``)."""
    widths = sorted({16} | {v for v in _REGISTRY if isinstance(v, int)}, reverse=True)
    return tuple(widths) + tuple(v for v in _REGISTRY if not isinstance(v, int))


@dataclass(frozen=True)
class Codec:
    """One wire format: rows of ``hidden`` values <-> fixed-width byte rows (``row_bytes``), scales first.

    Subclasses set :attr:`level` and implement the size math and the torch reference; ``encode`` /
    ``decode`` run the Triton kernels on CUDA (same bytes) and the reference elsewhere.

    Attributes:
        hidden: values per row.
        ratio: ``'auto'``'s byte target relative to bf16 (other levels ignore it).
        round_scale: level 8: scales rounded up to a power of two.
        use_ue8m0: level 8: one byte per scale, its biased exponent (implies ``round_scale``).
        fixed_upgrades: ``'auto'``: ``k`` given (tolerance mode) instead of derived from ``ratio``.
    """

    level: ClassVar[Level] = 16
    hidden: int
    ratio: float = 0.3
    round_scale: bool = False
    use_ue8m0: bool = False
    fixed_upgrades: Optional[int] = None

    # ------------------------------------------------------------------ what each level defines
    @property
    def blocks(self) -> int:
        """Scale blocks per row."""
        raise NotImplementedError

    @property
    def row_bytes(self) -> int:
        """Bytes of one packed row on the wire."""
        raise NotImplementedError

    @property
    def scale_bytes(self) -> int:
        """Bytes of the scales at the start of a packed row."""
        raise NotImplementedError

    @property
    def upgrades(self) -> int:
        """``'auto'``: int8 blocks per row; 0 for the other levels."""
        return 0

    @property
    def header_code(self) -> int:
        """An int that differs between wire formats (travels in the metadata header, so ranks that
        disagree on the format raise instead of decoding garbage)."""
        raise NotImplementedError

    @classmethod
    def make(
        cls,
        hidden: int,
        ratio: Optional[float],
        round_scale: bool,
        use_ue8m0: bool,
        upgrades: Optional[int],
    ) -> "Codec":
        """Validate the level's own arguments and build the codec (``hidden`` is checked already)."""
        if upgrades is not None:
            raise DeepEPInputError(f"upgrades is for level 'auto', got level {cls.level!r}")
        return cls(hidden, 0.3 if ratio is None else float(ratio), bool(round_scale or use_ue8m0), bool(use_ue8m0))

    def encode_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The torch reference of :meth:`encode` (any device): ``[T, H]`` -> ``uint8 [T, row_bytes]``."""
        raise NotImplementedError

    def decode_reference(self, packed: torch.Tensor) -> torch.Tensor:
        """The torch reference of :meth:`decode`: packed rows -> float32 ``[N, H]``."""
        raise NotImplementedError

    def _kernel_encode(self, x: torch.Tensor, index: Optional[torch.Tensor], out: torch.Tensor) -> None:
        """Launch the level's encode kernel (``x[index]`` when ``index`` is given) into ``out``."""
        raise NotImplementedError

    def _kernel_decode(self, packed: torch.Tensor, out: torch.Tensor) -> None:
        """Launch the level's decode kernel into ``out`` (contiguous ``[N, H]``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    def encode(
        self, x: torch.Tensor, index: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Pack rows.

        Args:
            x: floating ``[T, H]``.
            index: int64 ``[N]`` rows of ``x`` to pack (``x[index]``), or ``None`` for all.
            out: ``uint8 [N, row_bytes]`` with contiguous rows (e.g. a staging region), or ``None``.

        Returns:
            ``uint8 [N, row_bytes]`` (``out`` when given); Triton on CUDA, the same bytes as the reference.
        """
        self._check(x)
        if _use_kernels(x):
            x = x.contiguous()
            n = index.numel() if index is not None else x.size(0)
            if out is None:
                out = torch.empty((n, self.row_bytes), dtype=torch.uint8, device=x.device)
            if n:
                self._kernel_encode(x, index.contiguous() if index is not None else None, out)
            return out
        if index is not None:
            x = x.index_select(0, index)
        got = self.encode_reference(x)
        if out is None:
            return got
        out.copy_(got)
        return out

    def decode(
        self, packed: torch.Tensor, dtype: torch.dtype = torch.bfloat16, out: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Unpack rows.

        Args:
            packed: ``uint8 [N, row_bytes]``.
            dtype: the floating dtype of the result.
            out: ``[N, H]`` of ``dtype`` to write into, or ``None``.

        Returns:
            ``[N, H]`` of ``dtype`` (``out`` when given); Triton on CUDA, the same values as the reference.
        """
        if packed.dim() != 2 or packed.size(1) != self.row_bytes or packed.dtype != torch.uint8:
            raise DeepEPInputError(
                f"packed rows must be uint8 [N, {self.row_bytes}] for {self}, got {packed.dtype} {list(packed.shape)}"
            )
        if _use_kernels(packed) and (out is None or out.is_contiguous()):
            packed = packed.contiguous()
            if out is None:
                out = torch.empty((packed.size(0), self.hidden), dtype=dtype, device=packed.device)
            if packed.size(0):
                self._kernel_decode(packed, out)
            return out
        got = saturate(self.decode_reference(packed), dtype).to(dtype)
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

    def _empty(self, x: torch.Tensor) -> torch.Tensor:
        return torch.empty((0, self.row_bytes), dtype=torch.uint8, device=x.device)

    def __repr__(self) -> str:
        extra = ""
        if self.level == "auto":
            extra = f", upgrades={self.upgrades}"
        elif self.use_ue8m0 or self.round_scale:
            extra = f", round_scale={self.round_scale}, use_ue8m0={self.use_ue8m0}"
        return f"{type(self).__name__}(level={self.level!r}, hidden={self.hidden}{extra})"


def _use_kernels(t: torch.Tensor) -> bool:
    from .. import kernels

    return kernels.available(t)


def make_codec(
    level: Level,
    hidden: int,
    ratio: Optional[float] = None,
    round_scale: bool = False,
    use_ue8m0: bool = False,
    upgrades: Optional[int] = None,
) -> Codec:
    """A codec of a registered level, validating the arguments.

    Args:
        level: a registered level (8, 4, ``'auto'``; 16 has no codec).
        hidden: values per row (> 0).
        ratio: ``'auto'``'s byte target in (0, 1] (default ``DEEP_EP_COMPRESSION_RATIO`` or 0.3).
        round_scale, use_ue8m0: level 8's scale options.
        upgrades: ``'auto'`` only, instead of ``ratio``: ``k`` int8 blocks per row, in ``[0, ceil(hidden / 32)]``.

    Returns:
        The :class:`Codec`.
    """
    cls = _REGISTRY.get(level) if not isinstance(level, bool) else None
    if cls is None:
        names = ", ".join(repr(v) for v in levels())
        raise DeepEPInputError(f"compression level must be one of {names}; got {level!r}")
    if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
        raise DeepEPInputError(f"hidden must be a positive int, got {hidden!r}")
    if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise DeepEPInputError(f"compression ratio must be in (0, 1], got {ratio!r}")
    return cls.make(hidden, ratio, round_scale, use_ue8m0, upgrades)


__all__ += ["view_rows"]
