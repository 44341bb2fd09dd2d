"""Metadata agreement: the small exchange every collective call of a Buffer starts with.

Each rank sends a fixed-size header (operation, call number, shapes, dtype,
its own input-validation verdict) plus a payload of ints; every rank then
reaches the same verdict from the same gathered data, so that ranks which
disagree, or a rank whose input is bad, make *every* rank raise a clear
error instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .errors import DeepEPInputError, RankMismatchError, RemoteInputError
from .streams import ints_to_device

__all__ = ["Problem", "HEADER", "make_header", "agree", "agree_rows", "check_rows", "check_id_ranges"]

_MAGIC = 0xDEE9
_H_MAGIC, _H_OP, _H_SEQ, _H_ERR, _H_T, _H_HIDDEN, _H_DTYPE, _H_K, _H_E, _H_SCALES, _H_W, _H_WORST, _H_LEVEL = range(13)
#: slot 13 is the tolerance exchange's (deep_ep.wire); slot 14 the identity of the Buffer or handle the call
#: belongs to (ranks that use two Buffers, or two handles, in a different order disagree there)
_H_IDENT = 14
#: slot 15: a call-specific value every rank must agree on (a low-latency call's settings, packed by
#: :func:`settings_code`)
_H_AUX = 15
_HEADER = 16
_OP_DISPATCH, _OP_CACHED, _OP_COMBINE = 1, 2, 3
_OP_LOW_LATENCY = 4
_OP_NAMES = {
    _OP_DISPATCH: "dispatch",
    _OP_CACHED: "cached dispatch",
    _OP_COMBINE: "combine",
    _OP_LOW_LATENCY: "low-latency call",
}
_ERR_NAMES = {
    1: "invalid x",
    2: "invalid topk_idx",
    3: "invalid topk_weights",
    4: "invalid handle",
    5: "invalid layout arguments",
    6: "invalid bias",
    7: "invalid argument",
    8: "invalid low-latency input",
}
DTYPE_CODES: Dict[Any, int] = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3, torch.float64: 4}
for _i, _d in enumerate((getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None))):
    if _d is not None:
        DTYPE_CODES[_d] = 10 + _i
HEADER = _HEADER


class Problem(Exception):
    """A local input problem, carried through the metadata exchange before it is raised."""

    def __init__(self, code: int, exc: Exception) -> None:
        super().__init__(str(exc))
        self.code = code
        self.exc = exc

    def raise_on(self, rank: int) -> None:
        """Raise the carried error, its message starting with the rank that found it."""
        exc = self.exc
        if exc.args and isinstance(exc.args[0], str) and not exc.args[0].startswith("rank "):
            exc.args = (f"rank {rank}: {exc.args[0]}",) + tuple(exc.args[1:])
        raise exc


def make_header(
    op: int,
    seq: int,
    err: int = 0,
    T: int = -1,
    H: int = -1,
    dtype: Any = None,
    K: int = -1,
    E: int = -1,
    scales: int = -1,
    has_w: int = 0,
    worst: int = 0,
    level: int = 16,
    ident: int = 0,
    aux: int = 0,
) -> List[int]:
    """The fixed-size header of one call: operation, call number, verdict on the local input, shapes, and
    the identity of the Buffer or handle it belongs to (``ident``)."""
    h = [0] * _HEADER
    h[_H_MAGIC], h[_H_OP], h[_H_SEQ], h[_H_ERR] = _MAGIC, op, seq, err
    h[_H_T], h[_H_HIDDEN], h[_H_DTYPE] = T, H, DTYPE_CODES.get(dtype, 99) if dtype is not None else -1
    h[_H_K], h[_H_E], h[_H_SCALES], h[_H_W], h[_H_WORST] = K, E, scales, has_w, worst
    h[_H_LEVEL] = level
    h[_H_IDENT] = ident
    h[_H_AUX] = aux
    return h


def settings_code(*values: Any) -> int:
    """A non-negative int that differs (with overwhelming odds) between different tuples of settings: the
    header's ``aux`` value of a call whose settings every rank must share."""
    import zlib

    return zlib.crc32(repr(tuple(values)).encode()) + 1


_DTYPE_NAMES = {code: str(dt).replace("torch.", "") for dt, code in DTYPE_CODES.items()}


def describe(slot: int, value: int) -> str:
    """A header value as a person reads it: dtype and compression-level codes by name."""
    if slot == _H_DTYPE:
        return _DTYPE_NAMES.get(value, "none" if value == -1 else f"unknown dtype code {value}")
    if slot == _H_LEVEL:
        if value == 16:
            return "16 (no compression)"
        if value < 0:
            return f"'auto' with tolerance {-value / 1e9:g}"
        from .codecs import registry

        for lvl in registry():
            if lvl == "auto" and value >= 100000:
                return f"'auto' ({value - 100000} int8 blocks per row)"
            if lvl != "auto" and value // 10 == lvl:
                extra = {1: ", scales rounded to powers of two", 3: ", UE8M0 scales"}.get(value % 10, "")
                return f"{lvl}{extra}"
        return f"unknown level code {value}"
    if slot == _H_OP:
        return _OP_NAMES.get(value, str(value))
    if slot == _H_IDENT:
        return f"Buffer {value >> 40}, handle {value & ((1 << 40) - 1)}" if value >> 40 else f"Buffer {value}"
    return str(value)


def agree(
    transport: Any,
    device: torch.device,
    header: List[int],
    payload: Union[torch.Tensor, Sequence[torch.Tensor], None],
    problem: Optional[Problem],
    fields: Sequence[Tuple[int, str]],
) -> torch.Tensor:
    """Exchange headers (+ a payload of int64 of the same length everywhere); raise consistently on every rank."""
    return agree_rows(transport, device, header, payload, problem, fields)[0]


def agree_rows(
    transport: Any,
    device: torch.device,
    header: List[int],
    payload: Union[torch.Tensor, Sequence[torch.Tensor], None],
    problem: Optional[Problem],
    fields: Sequence[Tuple[int, str]],
    head: int = _HEADER,
) -> Tuple[torch.Tensor, List[List[int]]]:
    """:func:`agree`, also returning the first ``head`` columns of every rank's vector as Python ints.

    ``payload``: one int tensor or several 1-D int tensors (int32 or int64; concatenated as int64
    after the header, in one ``torch.cat``). The gathered vectors are read on the host once.
    """
    vec = ints_to_device(header, torch.int64, device if payload is not None else torch.device("cpu"))
    if payload is not None:
        parts = [payload] if isinstance(payload, torch.Tensor) else list(payload)
        for i, p in enumerate(parts):
            if p.device != vec.device or p.dtype not in (torch.int64, torch.int32) or p.dim() != 1:
                parts[i] = p.to(device=device, dtype=torch.int64).reshape(-1)
        vec = torch.cat([vec] + parts)  # int32 parts are promoted to int64
    gathered = transport.all_gather_ints(vec, f"{_OP_NAMES.get(header[_H_OP], '?')} metadata")
    rows = (gathered if head >= gathered.size(1) else gathered[:, :head]).tolist()
    check_rows(rows, header[_H_OP], problem, fields, getattr(transport, "rank", 0))
    return gathered, rows


def check_rows(
    rows: Sequence[Sequence[int]], op: int, problem: Optional[Problem], fields: Sequence[Tuple[int, str]], me: int
) -> None:
    """The verdict on every rank's header (``rows[r][:HEADER]``, the same list on every rank): raise the same
    error on every rank, or return.

    A rank that rejected its input raises its own error (``problem``), the others
    :class:`~deep_ep.errors.RemoteInputError` naming it; ranks that disagree on the operation, the call
    number, the Buffer / handle, the call's settings or a field of ``fields`` raise
    :class:`~deep_ep.errors.RankMismatchError` naming the odd ones.

    Args:
        rows: every rank's header (at least :data:`HEADER` ints each).
        op: the call's operation code (in messages).
        problem: this rank's own input problem, or ``None``.
        fields: ``(header slot, name)`` pairs every rank must agree on.
        me: this rank.
    """
    R = len(rows)
    errs = {r: row[_H_ERR] for r, row in enumerate(rows) if row[_H_ERR] != 0}
    if errs:
        if problem is not None:
            problem.raise_on(me)
        desc = "; ".join(f"rank {r}: {_ERR_NAMES.get(c, 'invalid input')}" for r, c in sorted(errs.items()))
        raise RemoteInputError(
            f"deep_ep {_OP_NAMES.get(op, '')}: another rank rejected its input "
            f"({desc}); see that rank's error. Nothing was sent."
        )
    if problem is not None:  # pragma: no cover - err slot always set with a problem
        problem.raise_on(me)
    bad = [r for r, row in enumerate(rows) if row[_H_MAGIC] != _MAGIC]
    if bad:
        raise RankMismatchError(f"ranks {bad} sent garbage metadata: they are running a different collective")
    always = (
        (_H_OP, "operation"),
        (_H_SEQ, "call sequence number"),
        (_H_IDENT, "Buffer / handle"),
        (_H_AUX, "low-latency settings (num_max_dispatch_tokens_per_rank, hidden, num_experts, top-k, fp8)"),
    )
    for slot, name in always + tuple(fields):
        vals = [row[slot] for row in rows]
        if len(set(vals)) > 1:
            vals_s = [describe(slot, v) for v in vals]
            groups: Dict[str, List[int]] = {}
            for r, v in enumerate(vals_s):
                groups.setdefault(v, []).append(r)
            majority = max(groups.values(), key=len)
            odd = [r for r in range(R) if r not in majority]
            detail = ", ".join(f"rank {r}: {vals_s[r]}" for r in range(R))
            raise RankMismatchError(
                f"deep_ep: ranks disagree on {name} in {_OP_NAMES.get(op, 'a call')} "
                f"(disagreeing rank(s): {odd}; {detail}). Every rank must call with the same "
                f"{name}. Nothing was sent."
            )


def check_id_ranges(ranges: Union[torch.Tensor, Sequence[Sequence[int]]], num_experts: int, rank: int) -> None:
    """Every rank's (min, max) expert id, exchanged with the metadata: raise consistently if any is out of range.

    ``ranges``: ``[R, >= 2]`` (a tensor or lists of ints), columns 0 and 1 are each rank's min and max."""
    if isinstance(ranges, torch.Tensor):
        ranges = ranges[:, :2].tolist()
    bad = {
        r: (int(row[0]), int(row[1])) for r, row in enumerate(ranges) if int(row[0]) < -1 or int(row[1]) >= num_experts
    }
    if not bad:
        return
    if rank in bad:
        lo, hi = bad[rank]
        raise DeepEPInputError(
            f"topk_idx holds expert id {lo if lo < -1 else hi}, outside [-1, {num_experts}) "
            f"(num_experts={num_experts}; -1 means no expert). Nothing was sent."
        )
    desc = "; ".join(f"rank {r}: invalid topk_idx" for r in sorted(bad))
    raise RemoteInputError(
        f"deep_ep dispatch: another rank rejected its input ({desc}); see that rank's error. Nothing was sent."
    )
