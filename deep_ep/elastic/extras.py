"""V2's non-EP extras on :class:`deep_ep.ElasticBuffer`: pipeline-parallel send/recv and all-gather sessions
(AGRS) over ``torch.distributed``; Engram raises ``NotImplementedError`` naming the alternative.

V2 runs these on its NVLink/RDMA runtime with zero SMs. Here they are plain
``torch.distributed`` point-to-point and all-gather operations on the
ElasticBuffer's group: the same results, none of the SM savings.
"""

from __future__ import annotations

import math
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Deque, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from ..errors import DeepEPInputError
from .layout import align_up

__all__ = ["ExtrasMixin", "BUFFER_ALIGNMENT"]

#: V2 sizes its buffers in multiples of 2 MiB; the size hints keep that convention.
BUFFER_ALIGNMENT = 2 << 20

Shapes = Union[Tuple[int, ...], torch.Size, Sequence[Union[Tuple[int, ...], torch.Size]]]

_ENGRAM_ALTERNATIVE = (
    "Engram's one-sided remote fetch needs RDMA gets, which deep_ep's transports do not have "
    "(every deep_ep exchange is collective). Alternatives: keep the table replicated, or fetch rows "
    "collectively with every rank calling: deep_ep.SparseCollective(indices // entries_per_rank, "
    "num_experts=num_ranks) routes the indices to their owners and .reverse() brings the rows back "
    "(or torch.distributed.all_to_all_single)."
)


def _is_batched(shapes: Shapes) -> bool:
    return len(shapes) > 0 and isinstance(shapes[0], (tuple, list, torch.Size))


def _all_gather_flat(out: torch.Tensor, t: torch.Tensor, group: dist.ProcessGroup) -> Any:
    """All-gather ``t`` into the flat ``out`` (``R * t.numel()`` elements), asynchronously."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # (the newer name first)
    return fn(out, t, group=group, async_op=True)


class ExtrasMixin:
    """PP, AGRS and Engram methods of :class:`deep_ep.ElasticBuffer` (see the module docstring)."""

    group: dist.ProcessGroup
    rank_idx: int
    num_ranks: int

    def _extras_init(self) -> None:
        self._pp_limits: Optional[Tuple[int, int]] = None
        self._pp_inflight: Deque[Tuple[Any, torch.Tensor]] = deque()
        self._agrs_limits: Optional[Tuple[int, int]] = None
        self._agrs_open = False
        self._agrs_pending: List[Any] = []

    def _extras_destroy(self) -> None:
        while self._pp_inflight:
            self._pp_inflight.popleft()[0].wait()
        for work in self._agrs_pending:
            work.wait()
        self._agrs_pending = []

    # ------------------------------------------------------------------ size hints (pure arithmetic)
    @staticmethod
    def get_engram_storage_size_hint(
        num_entries: int, hidden: int, num_max_tokens_per_rank: int, dtype: torch.dtype = torch.bfloat16
    ) -> Tuple[int, int]:
        """V2's Engram sizes: ``(receive bytes, storage bytes)``, each rounded up to 2 MiB (entries padded
        to 32 bytes).

        Args:
            num_entries: entries stored per rank.
            hidden: values per entry.
            num_max_tokens_per_rank: entries one fetch may return.
            dtype: the entries' dtype.

        Returns:
            ``(num_gpu_bytes, num_cpu_bytes)`` ints.
        """
        itemsize = torch.empty((), dtype=dtype, device="cpu").element_size()
        per_entry = align_up(hidden * itemsize, 32)
        return (
            align_up(per_entry * num_max_tokens_per_rank, BUFFER_ALIGNMENT),
            align_up(per_entry * num_entries, BUFFER_ALIGNMENT),
        )

    @staticmethod
    def get_pp_buffer_size_hint(num_max_tensor_bytes: int, num_max_inflight_tensors: int) -> int:
        """V2's PP buffer size: send and receive areas for both ring neighbours, rounded up to 2 MiB.

        Args:
            num_max_tensor_bytes: the largest tensor one send moves.
            num_max_inflight_tensors: sends that may be outstanding at once.

        Returns:
            Bytes (int).
        """
        return align_up(align_up(num_max_tensor_bytes, 32) * num_max_inflight_tensors * 4, BUFFER_ALIGNMENT)

    @staticmethod
    def get_agrs_num_max_session_bytes(group: dist.ProcessGroup, shapes: Shapes, dtype: torch.dtype) -> int:
        """Bytes the gathered results of one AGRS session take (each rounded up to 32 bytes).

        Args:
            group: the communication group.
            shapes: one local shape, or a sequence of them.
            dtype: the tensors' dtype.

        Returns:
            Bytes (int).
        """
        itemsize = torch.empty((), dtype=dtype, device="cpu").element_size()
        if not _is_batched(shapes):
            shapes = (shapes,)
        R = dist.get_world_size(group)
        return sum(align_up(R * math.prod(s) * itemsize, 32) for s in shapes)

    @staticmethod
    def get_agrs_buffer_size_hint(group: dist.ProcessGroup, num_max_session_bytes: int) -> int:
        """``num_max_session_bytes`` rounded up to 2 MiB (V2's AGRS buffer size).

        Args:
            group: the communication group (unused; V2's signature).
            num_max_session_bytes: from :meth:`get_agrs_num_max_session_bytes`.

        Returns:
            Bytes (int).
        """
        return align_up(num_max_session_bytes, BUFFER_ALIGNMENT)

    # ------------------------------------------------------------------ Engram
    def engram_write(self, storage: torch.Tensor, sf: Optional[torch.Tensor] = None) -> None:
        """Not available: V2's Engram storage is read by one-sided RDMA fetches.

        Args:
            storage: ``[num_entries, hidden]`` entries of this rank.
            sf: fp8 scale factors of all entries, or ``None``.

        Raises:
            NotImplementedError: always, naming the collective alternative.
        """
        raise NotImplementedError(f"ElasticBuffer.engram_write: {_ENGRAM_ALTERNATIVE}")

    def engram_fetch(
        self, indices: torch.Tensor, num_qps: int = 0, use_tma_aligned_col_major_sf: bool = False
    ) -> Callable[[], Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Not available: a one-sided fetch of remote Engram entries.

        Args:
            indices: int32 ``[num_tokens, entries_per_token]`` global entry ids.
            num_qps: V2's QP count.
            use_tma_aligned_col_major_sf: V2's scale-factor layout flag.

        Raises:
            NotImplementedError: always, naming the collective alternative.
        """
        raise NotImplementedError(f"ElasticBuffer.engram_fetch: {_ENGRAM_ALTERNATIVE}")

    # ------------------------------------------------------------------ pipeline-parallel send/recv
    def pp_set_config(self, num_max_tensor_bytes: int, num_max_inflight_tensors: int) -> None:
        """Set the PP limits, after finishing the sends still in flight.

        Args:
            num_max_tensor_bytes: the largest tensor one send moves (bytes).
            num_max_inflight_tensors: sends that may be outstanding at once (older ones are waited for).
        """
        if num_max_tensor_bytes <= 0 or num_max_inflight_tensors <= 0:
            raise DeepEPInputError(
                f"pp_set_config: both limits must be positive, got {num_max_tensor_bytes}, {num_max_inflight_tensors}"
            )
        while self._pp_inflight:
            self._pp_inflight.popleft()[0].wait()
        self._pp_limits = (int(num_max_tensor_bytes), int(num_max_inflight_tensors))

    def _pp_peer(self, t: torch.Tensor, peer: int, what: str) -> int:
        if self._pp_limits is None:
            raise DeepEPInputError(f"{what}: call pp_set_config(...) first")
        if not isinstance(t, torch.Tensor) or not t.is_contiguous():
            raise DeepEPInputError(f"{what}: the tensor must be contiguous")
        if t.numel() * t.element_size() > self._pp_limits[0]:
            raise DeepEPInputError(
                f"{what}: {t.numel() * t.element_size()} bytes exceed num_max_tensor_bytes={self._pp_limits[0]}"
            )
        R = self.num_ranks
        if peer not in ((self.rank_idx + 1) % R, (self.rank_idx - 1) % R) or peer == self.rank_idx:
            raise DeepEPInputError(f"{what}: rank {self.rank_idx} may only talk to its ring neighbours, got {peer}")
        return dist.get_global_rank(self.group, peer)

    def pp_send(self, t: torch.Tensor, dst_rank_idx: int, num_sms: int = 0) -> None:
        """Send ``t`` to a ring neighbour; returns at once (the tensor may be reused: it is copied).

        Args:
            t: a contiguous tensor within ``num_max_tensor_bytes``.
            dst_rank_idx: the previous or next rank of the group.
            num_sms: V2's SM count (no effect).
        """
        peer = self._pp_peer(t, dst_rank_idx, "pp_send")
        while len(self._pp_inflight) >= self._pp_limits[1]:
            self._pp_inflight.popleft()[0].wait()
        copy = t.clone()
        self._pp_inflight.append((dist.isend(copy, peer, group=self.group), copy))

    def pp_recv(self, t: torch.Tensor, src_rank_idx: int, num_sms: int = 0) -> None:
        """Receive the oldest unreceived tensor ``src_rank_idx`` sent to this rank, into ``t``.

        Args:
            t: the output, contiguous, of the sent tensor's size and dtype.
            src_rank_idx: the previous or next rank of the group.
            num_sms: V2's SM count (no effect).
        """
        peer = self._pp_peer(t, src_rank_idx, "pp_recv")
        dist.recv(t, peer, group=self.group)

    # ------------------------------------------------------------------ all-gather sessions (AGRS)
    def agrs_set_config(self, num_max_session_bytes: int, num_max_all_gathers_per_session: int) -> None:
        """Set the AGRS limits (after finishing outstanding all-gathers).

        Args:
            num_max_session_bytes: gathered bytes one session may hold.
            num_max_all_gathers_per_session: all-gathers one session may issue.
        """
        for work in self._agrs_pending:
            work.wait()
        self._agrs_pending = []
        self._agrs_limits = (int(num_max_session_bytes), int(num_max_all_gathers_per_session))

    def create_agrs_session(self) -> None:
        """Open an AGRS session (pair it with :meth:`destroy_agrs_session`)."""
        if self._agrs_open:
            raise DeepEPInputError("create_agrs_session: a session is already open")
        self._agrs_open = True

    def destroy_agrs_session(self) -> None:
        """Close the AGRS session, finishing its all-gathers."""
        if not self._agrs_open:
            raise DeepEPInputError("destroy_agrs_session: no session is open")
        for work in self._agrs_pending:
            work.wait()
        self._agrs_pending = []
        self._agrs_open = False

    @contextmanager
    def agrs_new_session(self, enabled: bool = True) -> Iterator[None]:
        """``with buffer.agrs_new_session(): ...`` opens and closes a session (nothing if not ``enabled``).

        Args:
            enabled: whether to open a session at all.
        """
        if not enabled:
            yield
            return
        self.create_agrs_session()
        try:
            yield
        finally:
            self.destroy_agrs_session()

    def agrs_get_inplace_tensor(
        self, shapes: Shapes, dtype: torch.dtype
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
        """Tensors to fill and pass to :meth:`all_gather` (V2 hands out views of its buffer; here they are
        fresh allocations, so nothing is saved, but code written for V2 runs).

        Args:
            shapes: one shape, or a sequence of shapes.
            dtype: their dtype.

        Returns:
            One tensor, or a tuple for a sequence of shapes.
        """
        if not self._agrs_open:
            raise DeepEPInputError("agrs_get_inplace_tensor: open a session first (create_agrs_session)")
        batched = _is_batched(shapes)
        dev = self.buffer.device
        out = tuple(torch.empty(tuple(s), dtype=dtype, device=dev) for s in (shapes if batched else (shapes,)))
        return out if batched else out[0]

    def all_gather(self, t: Union[torch.Tensor, Sequence[torch.Tensor]]):
        """All-gather within the open session.

        Args:
            t: a tensor, or a sequence of tensors (same on every rank, in the same order).

        Returns:
            ``(gathered, wait)`` for one tensor, ``(*gathered, wait)`` for a sequence: each gathered tensor
            is ``[num_ranks, *shape]``; call ``wait()`` before reading them.
        """
        if not self._agrs_open:
            raise DeepEPInputError("all_gather: open a session first (create_agrs_session)")
        single = isinstance(t, torch.Tensor)
        tensors = [t] if single else list(t)
        outs, works = [], []
        for x in tensors:
            flat = torch.empty((self.num_ranks * x.numel(),), dtype=x.dtype, device=x.device)
            works.append(_all_gather_flat(flat, x.contiguous().view(-1), self.group))
            outs.append(flat.view((self.num_ranks,) + tuple(x.shape)))
        self._agrs_pending.extend(works)

        def wait() -> None:
            for w in works:
                w.wait()

        return (outs[0], wait) if single else (*outs, wait)
