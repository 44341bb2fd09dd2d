"""Tuning knobs (:class:`Config`) and events (:class:`EventOverlap`); settings live in :mod:`deep_ep.settings`."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch

#: dtype of ``topk_idx`` tensors everywhere in the API.
topk_idx_t = torch.int64


_MAX_TOPK = 128
_MAX_SCALES = 128


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


class Config:
    """Kernel tuning knobs, DeepEP-compatible.

    ``num_sms`` bounds the number of streaming multiprocessors (persistent
    programs) the intranode kernels use; the chunk sizes bound how many tokens
    one program moves per step through the staging buffers. The collective
    transport accepts and ignores them.
    """

    def __init__(
        self,
        num_sms: int = 20,
        num_max_nvl_chunked_send_tokens: int = 6,
        num_max_nvl_chunked_recv_tokens: int = 256,
        num_max_rdma_chunked_send_tokens: int = 6,
        num_max_rdma_chunked_recv_tokens: int = 256,
    ) -> None:
        for name, value in (
            ("num_sms", num_sms),
            ("num_max_nvl_chunked_send_tokens", num_max_nvl_chunked_send_tokens),
            ("num_max_nvl_chunked_recv_tokens", num_max_nvl_chunked_recv_tokens),
            ("num_max_rdma_chunked_send_tokens", num_max_rdma_chunked_send_tokens),
            ("num_max_rdma_chunked_recv_tokens", num_max_rdma_chunked_recv_tokens),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Config.{name} must be a positive int, got {value!r}")
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = num_max_rdma_chunked_recv_tokens

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of intranode staging memory this config needs for rows of ``hidden_bytes``.

        Counts, per channel (two SMs) and peer, ``num_max_nvl_chunked_recv_tokens``
        rows with room for top-k ids, weights and fp8 scales, plus counters;
        rounded up to 128 bytes.
        """
        num_nvl_ranks = min(num_ranks, 8)
        num_rdma_ranks = max(num_ranks // 8, 1)
        channels = max(self.num_sms // 2, 1)
        per_token = hidden_bytes + _MAX_TOPK * (8 + 4) + _MAX_SCALES * 4 + 16
        nbytes = channels * num_nvl_ranks * (2 * num_rdma_ranks + 3) * 4
        nbytes += channels * num_nvl_ranks * self.num_max_nvl_chunked_recv_tokens * per_token
        return _align(nbytes, 128)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of internode staging memory this config needs (0 on one node of <= 8 ranks)."""
        if num_ranks <= 8:
            return 0
        num_rdma_ranks = num_ranks // 8
        channels = max(self.num_sms // 2, 1)
        per_token = hidden_bytes + _MAX_TOPK * (8 + 4) + _MAX_SCALES * 4 + 16
        nbytes = channels * num_rdma_ranks * (num_rdma_ranks * 8 + 2) * 2 * 4
        nbytes += channels * num_rdma_ranks * self.num_max_rdma_chunked_recv_tokens * per_token * 2
        return _align(nbytes, 128)

    def __repr__(self) -> str:
        return (
            f"Config(num_sms={self.num_sms}, num_max_nvl_chunked_send_tokens={self.num_max_nvl_chunked_send_tokens}, "
            f"num_max_nvl_chunked_recv_tokens={self.num_max_nvl_chunked_recv_tokens}, "
            f"num_max_rdma_chunked_send_tokens={self.num_max_rdma_chunked_send_tokens}, "
            f"num_max_rdma_chunked_recv_tokens={self.num_max_rdma_chunked_recv_tokens})"
        )


class EventOverlap:
    """A CUDA event plus the tensors that must stay alive until it completes.

    Returned by every asynchronous call. ``current_stream_wait()`` makes the
    current stream wait for the event (no host synchronisation); used as a
    context manager, the wait happens on exit. On CPU the event is ``None``
    and waiting is a no-op (the work already finished).
    """

    def __init__(self, event: Optional[Any] = None, extra_tensors: Optional[Iterable[Any]] = None) -> None:
        self.event = event
        self.extra_tensors = tuple(extra_tensors) if extra_tensors is not None else None

    def current_stream_wait(self) -> None:
        """Make the current CUDA stream wait for this event (no-op without an event)."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.event is not None:
            self.current_stream_wait()

    def __repr__(self) -> str:
        return f"EventOverlap(event={self.event!r})"


#: DeepEP's recommended (num_max_nvl_chunked_send_tokens, num_max_nvl_chunked_recv_tokens,
#: num_max_rdma_chunked_send_tokens, num_max_rdma_chunked_recv_tokens) per rank count.
_DISPATCH_TABLE = {
    2: (24, 256, 6, 128),
    4: (6, 256, 6, 128),
    8: (6, 256, 6, 128),
    16: (36, 288, 20, 128),
    24: (8, 288, 32, 128),
    32: (32, 288, 32, 128),
    48: (32, 288, 32, 128),
    64: (32, 288, 32, 128),
    96: (20, 480, 32, 128),
    128: (20, 560, 32, 128),
    144: (32, 720, 12, 128),
    160: (28, 720, 12, 128),
}
_COMBINE_TABLE = {
    2: (10, 256, 6, 128),
    4: (9, 256, 6, 128),
    8: (4, 256, 6, 128),
    16: (4, 288, 12, 128),
    24: (1, 288, 8, 128),
    32: (1, 288, 8, 128),
    48: (1, 288, 8, 128),
    64: (1, 288, 8, 128),
    96: (1, 480, 8, 128),
    128: (1, 560, 8, 128),
    144: (2, 720, 8, 128),
    160: (2, 720, 8, 128),
}


def recommended_config(op: str, num_ranks: int, num_sms: int) -> Config:
    """DeepEP's recommended :class:`Config` for ``op`` ('dispatch' or 'combine') at ``num_ranks`` ranks;
    other rank counts take the entry of the nearest tabulated size above (or the largest)."""
    from .errors import DeepEPInputError

    if not isinstance(num_ranks, int) or num_ranks <= 0:
        raise DeepEPInputError(f"num_ranks must be a positive int, got {num_ranks!r}")
    table = _DISPATCH_TABLE if op == "dispatch" else _COMBINE_TABLE
    above = [k for k in sorted(table) if k >= num_ranks]
    return Config(num_sms, *table[above[0] if above else max(table)])
