"""The ``nvlink`` transport: torch symmetric memory, rows stored straight into peer GPUs.

Every rank allocates one symmetric staging buffer (``num_nvl_bytes``, or
256 MiB by default) and rendezvouses once. Nothing goes through NCCL on the
hot path:

- **metadata** (:meth:`NVLinkTransport.all_gather_ints`): each rank stores its
  small int vector into slot ``rank`` of every peer's metadata area (two
  areas used alternately), then a device barrier; the host reads its own area.
- **dispatch**: the staging buffer holds one region per row tensor (token
  rows, then the small extras). Each rank gathers the rows it sends to rank
  ``j`` straight into ``j``'s region at their final row
  (``rank_prefix_matrix[src - 1][j] + slot``), with 16-byte vector stores
  over NVLink; rows for itself go straight into the output. After a barrier
  each rank copies its received rows out. When the rows do not fit, the call
  runs in rounds of as many rows as fit (every rank computes the same rounds
  from the counts matrix), with barriers as flow control.
- **combine**: each rank stores the rows it returns to source ``s`` into
  ``s``'s staging, contiguously at the offset of its block in ``s``'s
  destination-major send order; after a barrier each rank reduces locally in
  a fixed rank order (:func:`~deep_ep.transport.base.reduce_rows`).

This is the torch path of the intranode transport; Triton kernels that fuse
it (one persistent launch bounded by ``Config.num_sms``) plug in behind it
and are tested against it.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .. import kernels, layout
from ..errors import DeepEPError, DeepEPInputError
from .base import (Alloc, Plan, Transport, Waiter, alloc_outputs, as_bytes, reduce_rows, return_positions,
                   send_token_order)

log = logging.getLogger("deep_ep")

#: staging bytes per rank when ``num_nvl_bytes`` is 0
DEFAULT_STAGING_BYTES = 256 << 20
_META_SLOT = 4096          # int64 per rank per metadata area
_ALIGN = 256


def _align(n: int, a: int = _ALIGN) -> int:
    return (n + a - 1) // a * a


def _word(width: int) -> torch.dtype:
    for dt, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if width % size == 0:
            return dt
    return torch.uint8


def _words(t: torch.Tensor) -> torch.Tensor:
    """Rows of ``t`` as the widest integer words their byte width allows (``[N, w]``)."""
    b = as_bytes(t)
    return b.view(_word(b.size(1)))


class _EventWork:
    """Adapts a CUDA event to the ``is_completed`` / ``wait`` protocol of :class:`Waiter`."""

    def __init__(self, event: torch.cuda.Event) -> None:
        self.event = event

    def is_completed(self) -> bool:
        return self.event.query()

    def wait(self) -> None:
        self.event.synchronize()


class NVLinkTransport(Transport):
    """Intranode transport over torch symmetric memory (see the module docstring)."""

    name = "nvlink"
    #: all_gather_ints writes into fixed-size slots: vectors of different lengths cannot hang it
    fixed_slot_exchange = True

    def __init__(self, group: dist.ProcessGroup, device: torch.device, timeout_s: float, waiter: Waiter,
                 options: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(group, device, timeout_s, waiter, options)
        if device.type != "cuda":
            raise DeepEPError("backend='nvlink' needs an NCCL group on CUDA devices")
        import torch.distributed._symmetric_memory as symm_mem
        nbytes = int(self.options.get("num_nvl_bytes") or 0) or DEFAULT_STAGING_BYTES
        self.meta_bytes = 2 * self.num_ranks * _META_SLOT * 8
        if nbytes <= self.meta_bytes + _ALIGN:
            raise DeepEPInputError(f"num_nvl_bytes={nbytes} is too small for the nvlink transport "
                                   f"(needs more than {self.meta_bytes + _ALIGN} bytes)")
        self.nbytes = _align(nbytes)
        name = getattr(group, "group_name", None)
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None and name is not None:
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")    # deprecated (and unneeded) in newer torch
                try:
                    enable(name)
                except Exception:  # pragma: no cover
                    pass
        self.buf = symm_mem.empty(self.nbytes, dtype=torch.uint8, device=device)
        try:
            self.hdl = symm_mem.rendezvous(self.buf, group)
        except TypeError:  # pragma: no cover - older torch takes the group name
            self.hdl = symm_mem.rendezvous(self.buf, name)
        self.peers = [self.hdl.get_buffer(p, (self.nbytes,), torch.uint8, 0) for p in range(self.num_ranks)]
        self.data_offset = self.meta_bytes
        self.data_bytes = self.nbytes - self.data_offset
        self.meta_seq = 0
        self._barrier_ms = int(timeout_s * 1000) + 10_000   # the host gives up first, with a better message
        self._pinned: Optional[torch.Tensor] = None

    # ---------------------------------------------------------------- helpers
    def _barrier(self) -> None:
        self.hdl.barrier(channel=0, timeout_ms=self._barrier_ms)

    def _meta(self, peer: int, parity: int) -> torch.Tensor:
        start = parity * self.num_ranks * _META_SLOT * 8
        return self.peers[peer][start:start + self.num_ranks * _META_SLOT * 8].view(torch.int64).view(
            self.num_ranks, _META_SLOT)

    def _region(self, peer: int, offset: int, rows: int, width: int) -> torch.Tensor:
        """``[rows, width]`` bytes of ``peer``'s data area starting at ``offset``."""
        start = self.data_offset + offset
        return self.peers[peer][start:start + rows * width].view(rows, width)

    def _layout(self, widths: Sequence[int]) -> Tuple[int, List[int]]:
        """Rows per round and each tensor's region offset for rows of byte ``widths``."""
        per_row = sum(widths)
        cap = (self.data_bytes - _ALIGN * len(widths)) // max(per_row, 1)
        if cap < 1:
            raise DeepEPInputError(
                f"the nvlink staging buffer ({self.nbytes} bytes) cannot hold one row of {per_row} bytes; "
                f"pass num_nvl_bytes >= {self.meta_bytes + _ALIGN * (len(widths) + 1) + per_row}")
        offsets, off = [], 0
        for w in widths:
            offsets.append(off)
            off = _align(off + cap * w)
        while off > self.data_bytes:       # alignment padding pushed past the end: one row fewer
            cap -= 1
            offsets, off = [], 0
            for w in widths:
                offsets.append(off)
                off = _align(off + cap * w)
        return cap, offsets

    # ---------------------------------------------------------------- metadata
    def all_gather_ints(self, values: torch.Tensor, stage: str) -> torch.Tensor:
        values = values.to(device=self.device, dtype=torch.int64).reshape(-1)
        n = values.numel()
        if n > _META_SLOT:
            raise DeepEPInputError(f"metadata of {n} ints exceeds the nvlink metadata slot ({_META_SLOT}); "
                                   f"num_experts is too large for this transport")
        parity = self.meta_seq % 2
        self.meta_seq += 1
        for p in range(self.num_ranks):
            self._meta(p, parity)[self.rank, :n].copy_(values)
        self._barrier()
        if self._pinned is None:
            self._pinned = torch.empty((self.num_ranks * _META_SLOT,), dtype=torch.int64, device="cpu").pin_memory()
        host = self._pinned[:self.num_ranks * n].view(self.num_ranks, n)
        host.copy_(self._meta(self.rank, parity)[:, :n].contiguous(), non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self.waiter.wait(_EventWork(ev), stage)
        return host.clone()

    # ---------------------------------------------------------------- dispatch
    def dispatch(self, plan: Plan, rows: Sequence[torch.Tensor], alloc: Alloc) -> List[torch.Tensor]:
        R, me = self.num_ranks, self.rank
        counts = plan.counts
        if counts is None:
            raise DeepEPError("the nvlink transport needs the counts matrix in the plan")
        outs = alloc_outputs(plan, rows, alloc)
        if not rows:
            return outs
        src_words = [_words(t) for t in rows]
        out_words = [_words(o) for o in outs]
        widths = [as_bytes(t).size(1) for t in rows]
        cap, offsets = self._layout(widths)
        idx = send_token_order(plan)
        totals = counts.sum(dim=0).tolist()                     # rows each rank receives
        prefix = torch.cumsum(counts, dim=0)                    # [s][d]: rows ranks 0..s send to d
        my_first = [int(prefix[me - 1, d]) if me > 0 else 0 for d in range(R)]   # my first row at d
        send_off = [0]
        for c in plan.send_counts:
            send_off.append(send_off[-1] + c)
        rounds = max((max(totals) + cap - 1) // cap, 1) if max(totals) > 0 else 0
        # Rows from myself go straight into the output, once. (Running this on a side stream
        # beside the NVLink stores was measured slower on 2 x H200: 446 us vs 309 us.)
        c_me = plan.send_counts[me]
        if c_me:
            tok = idx[send_off[me]:send_off[me] + c_me]
            for sw, ow in zip(src_words, out_words):
                torch.index_select(sw, 0, tok, out=ow[my_first[me]:my_first[me] + c_me])
        # The Triton store kernel is opt-in (DEEP_EP_NVLINK_KERNEL=1) until it beats index_select:
        # on 2 x H200 at the normal workload it took 680 us (24 programs) against 309 us.
        use_kernel = kernels.available(rows[0]) and os.environ.get("DEEP_EP_NVLINK_KERNEL", "") not in ("", "0")
        slots = layout.token_slots(plan.is_token_in_rank) if use_kernel else None
        for r in range(rounds):
            lo, hi = r * cap, (r + 1) * cap
            self._barrier()                                     # receivers are done with the last round
            for d in range(R):
                if d == me:
                    continue
                a, b = max(my_first[d], lo), min(my_first[d] + plan.send_counts[d], hi)
                if a >= b:
                    continue
                if use_kernel:
                    # One persistent launch per tensor, Config.num_sms programs: every token with a
                    # slot at d whose row falls in this round's window is stored into d's staging.
                    from ..kernels import dispatch as kdispatch
                    for sw, w, off in zip(src_words, widths, offsets):
                        kdispatch.store_rows(sw, slots[:, d], my_first[d], lo, hi,
                                             self._region(d, off, cap, w).view(sw.dtype), self.num_sms)
                    continue
                tok = idx[send_off[d] + a - my_first[d]:send_off[d] + b - my_first[d]]
                for sw, w, off in zip(src_words, widths, offsets):
                    dst = self._region(d, off, cap, w)[a - lo:b - lo].view(sw.dtype)
                    torch.index_select(sw, 0, tok, out=dst)
            self._barrier()                                     # every sender's rows have landed
            n = min(totals[me], hi) - lo
            if n <= 0:
                continue
            mine_a, mine_b = my_first[me], my_first[me] + c_me  # rows already written locally
            for ow, w, off in zip(out_words, widths, offsets):
                local = self._region(me, off, cap, w)[:n].view(ow.dtype)
                for a, b in ((lo, min(lo + n, mine_a)), (max(lo, mine_b), lo + n)):
                    if a < b:
                        ow[a:b].copy_(local[a - lo:b - lo])
        return outs

    # ---------------------------------------------------------------- combine
    def combine(self, plan: Plan, x: torch.Tensor, weights: Optional[torch.Tensor],
                biases: Sequence[torch.Tensor], alloc: Alloc) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        R, me = self.num_ranks, self.rank
        counts = plan.counts
        n_recv = plan.num_recv_tokens
        S = sum(plan.send_counts)
        pos = return_positions(plan, x.device)
        srcs = [x[:n_recv].contiguous()]
        if weights is not None:
            srcs.append(weights[:n_recv].float().contiguous())
        src_words = [_words(t) for t in srcs]
        widths = [as_bytes(t).size(1) for t in srcs]
        cap, offsets = self._layout(widths)
        back_rows = counts.sum(dim=1).tolist()                   # rows each source gets back
        prefix = torch.cumsum(counts, dim=0)
        recv_first = [int(prefix[s - 1, me]) if s > 0 else 0 for s in range(R)]   # my rows from s start here
        # Where my block starts in each source's destination-major order.
        back_first = [int(counts[s, :me].sum()) for s in range(R)]
        rounds = max((max(back_rows) + cap - 1) // cap, 1) if max(back_rows) > 0 else 0
        if rounds <= 1 and S + 1 <= cap:
            backs = None                                          # reduce straight from staging
        else:
            backs = [torch.empty((S + 1, t.size(1)), dtype=t.dtype, device=x.device) for t in srcs]
        for r in range(rounds):
            lo, hi = r * cap, (r + 1) * cap
            self._barrier()
            for s in range(R):
                cnt = int(counts[s, me])
                a, b = max(back_first[s], lo), min(back_first[s] + cnt, hi)
                if a >= b:
                    continue
                first = recv_first[s] + a - back_first[s]
                for sw, w, off in zip(src_words, widths, offsets):
                    dst = self._region(s, off, cap, w)[a - lo:b - lo].view(sw.dtype)
                    dst.copy_(sw[first:first + b - a])
            self._barrier()
            if backs is not None:
                n = min(S, hi) - lo
                for bk, t, w, off in zip(backs, srcs, widths, offsets):
                    if n > 0:
                        as_bytes(bk[lo:lo + n]).copy_(self._region(me, off, cap, w)[:n])
        if backs is None:
            backs = []
            for t, w, off in zip(srcs, widths, offsets):
                view = self._region(me, off, cap, w)[:S + 1].view(t.dtype).view(S + 1, t.size(1))
                view[S].zero_()
                backs.append(view)
        else:
            for bk in backs:
                bk[S].zero_()
        out = reduce_rows(backs[0], pos, biases, x.dtype, alloc)
        out_w = reduce_rows(backs[1], pos, (), torch.float32, alloc) if weights is not None else None
        return out, out_w

    def destroy(self) -> None:
        self.peers = []
        self.hdl = None
        self.buf = None
