"""The ``nvlink`` transport: torch symmetric memory, rows moved over NVLink with no NCCL call.

Every rank allocates one symmetric staging buffer (``num_nvl_bytes``, or
256 MiB by default) and rendezvouses once. The buffer holds a metadata area
and two data halves. Work is a sequence of *phases*; each phase writes into
one half, passes one device barrier, then reads that half, and consecutive
phases alternate halves. A rank writes into a half only after the barrier of
the phase in between, which every rank reaches only after its reads of the
half's previous use: no second barrier is needed for flow control.

- **metadata** (:meth:`NVLinkTransport.all_gather_ints`): each rank stores its
  small int vector into slot ``rank`` of every peer's metadata area (two
  areas used alternately), then a device barrier; the host reads its own area.
- **dispatch** (pull): each rank gathers the rows it sends to other ranks,
  destination-major, into its own half (one local ``index_select`` per row
  tensor); its rows for itself go straight into the output. After the
  barrier each rank copies its block out of every peer's half into the
  output (contiguous NVLink reads; faster than gathered remote stores plus
  a copy-out, measured on 2 x H200: benchmarks/results/2026-11-28-nvidia-h200-pipeline-probe.json).
- **dispatch** (push, opt-in ``DEEP_EP_NVLINK_DISPATCH=push``): each rank copies runs
  of consecutive tokens it sends to ``d`` straight from its input into ``d``'s
  half (contiguous copies, no pack; the copy engines write at the link's
  rate where they read slower), in chunks of ``DEEP_EP_NVLINK_PUSH_CHUNKS``
  (default 2) with one barrier each; the receiver copies each chunk out of
  its half on the side stream while the next chunk's copies run. Used where
  a rank sends at most 64 runs to a peer and every rank's received rows fit
  one area (:meth:`~deep_ep.transport.nvlink.schedule.NVLinkSchedules._push_schedule`),
  else the pull; not yet measured on two GPUs, so off by default.
- **combine** (push): each rank copies the rows it returns to source ``s``
  (a contiguous block of its received rows) into ``s``'s half at the offset
  of its block in ``s``'s send order; after the barrier each rank reduces in
  a fixed rank order, reading remote rows from its half and its own rows
  straight from the input (:func:`~deep_ep.transport.base.reduce_rows`).
- **rounds**: when the rows do not fit a half, a call that fits the whole data
  area runs in one phase there (with a barrier before it and before the next
  phase); a larger one runs in rounds of as many rows as fit a half (every
  rank computes the same rounds from the counts).
- **pull** (``DEEP_EP_NVLINK_PULL``): ``copy`` (default) reads with ``copy_``
  (the copy engines), ``gather`` with an ``index_select`` kernel (SM loads).
- **chunks** (``DEEP_EP_NVLINK_CHUNKS``, default 1): a one-round call can be
  pipelined, one barrier per chunk: dispatch packs chunk ``c + 1`` while a
  side stream pulls chunk ``c``; combine reduces the tokens whose rows have
  all arrived while later chunks are stored. On 2 x H200 this path is bound by
  host time and chunking measured slower, so it is off by default.

The rows cross NVLink as ``copy_`` of contiguous blocks between symmetric
buffers, which CUDA runs on the copy engines: the transport's data movement
takes no SMs (``Config.num_sms`` bounds nothing here); the SM work is the
local gather (``index_select``) and the reduction kernel. With more than two
ranks the copies to (or from) different peers run on their own streams, so
several links are busy at once.

Everything that depends only on the layout (windows, offsets, index slices,
reduction positions) is computed once per handle and kept in the plan, so a
cached dispatch or a combine only launches copies.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ...errors import DeepEPError, DeepEPInputError
from ...rows import Alloc, as_bytes, reduce_rows
from ...settings import Settings, env_bool
from ...waiting import Waiter
from ..base import Plan, Transport, alloc_outputs, group_on_cuda, one_host
from .device_path import NVLinkDevicePath
from .fused import FusedPath, fused_control_bytes
from .schedule import (
    _ALIGN,
    DEFAULT_PUSH_CHUNKS,
    MIN_CHUNK_BYTES,
    NVLinkSchedules,
    _align,
    _capturing,
    _split,
    _windows,
)
from .symmetric import make_symmetric

__all__ = ["NVLinkTransport", "DEFAULT_STAGING_BYTES", "_split", "_windows"]

log = logging.getLogger("deep_ep")

#: staging bytes per rank when ``num_nvl_bytes`` is 0
DEFAULT_STAGING_BYTES = 256 << 20
#: the same on the CPU emulation (shared memory of the machine: smaller)
EMULATED_STAGING_BYTES = 16 << 20
_META_SLOT = 4096  # int64 per rank per metadata area


def _word(width: int) -> torch.dtype:
    for dt, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if width % size == 0:
            return dt
    return torch.uint8


def _words(t: torch.Tensor) -> torch.Tensor:
    """Rows of ``t`` as the widest integer words their byte width allows (``[N, w]``)."""
    if t.dim() == 2 and t.is_contiguous() and t.size(1) > 0:
        try:
            return t.view(_word(t.size(1) * t.element_size()))  # one view for the common [N, H] case
        except RuntimeError:
            pass  # storage offset not word aligned
    b = as_bytes(t)
    return b.view(_word(b.size(1)))


def _decoded(codec, backs: List[torch.Tensor], srcs: List[torch.Tensor], dtype: torch.dtype):
    """With a codec, the returned rows (``backs[0]``) and this rank's own rows (``srcs[0]``) decoded."""
    if codec is None:
        return backs, srcs
    return [codec.decode(backs[0], dtype)] + backs[1:], [codec.decode(srcs[0], dtype)] + srcs[1:]


class _EventWork:
    """Adapts a CUDA event to the ``is_completed`` / ``wait`` protocol of :class:`Waiter`."""

    def __init__(self, event: torch.cuda.Event) -> None:
        self.event = event

    def is_completed(self) -> bool:
        return self.event.query()

    def wait(self) -> None:
        self.event.synchronize()


class NVLinkTransport(NVLinkSchedules, NVLinkDevicePath, FusedPath, Transport):
    """Intranode transport over torch symmetric memory (see the module docstring)."""

    name = "nvlink"

    @classmethod
    def supported(cls, group: Optional[dist.ProcessGroup] = None) -> Tuple[bool, str]:
        """One host, a CUDA group, peer access between the local GPUs, torch symmetric memory."""
        if group is not None and not group_on_cuda(group) and env_bool("DEEP_EP_NVLINK_EMULATE", False):
            return True, "CPU ranks: emulated with shared memory (DEEP_EP_NVLINK_EMULATE=1; for tests, not speed)"
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        reasons = []
        if group is not None and not group_on_cuda(group):
            reasons.append("the group is not a CUDA (NCCL) group")
        if n < 2:
            reasons.append(f"needs >= 2 local GPUs (found {n})")
        else:
            peer = all(torch.cuda.can_device_access_peer(i, j) for i in range(n) for j in range(n) if i != j)
            if not peer:
                reasons.append("not every pair of local GPUs has peer access")
        if group is not None and group_on_cuda(group) and not one_host(group):
            reasons.append("the group spans more than one host")
        if importlib.util.find_spec("torch.distributed._symmetric_memory") is None:
            reasons.append("torch symmetric memory is unavailable")
        return not reasons, "; ".join(reasons) or "all ranks on one host with peer access"

    #: all_gather_ints writes into fixed-size slots: vectors of different lengths cannot hang it
    fixed_slot_exchange = True
    #: dispatch by pushing token runs (DEEP_EP_NVLINK_DISPATCH=push), and its chunks
    push = False
    push_chunks = DEFAULT_PUSH_CHUNKS

    def __init__(
        self,
        group: dist.ProcessGroup,
        device: torch.device,
        waiter: Waiter,
        settings: Settings,
        num_nvl_bytes: int = 0,
    ) -> None:
        super().__init__(group, device, waiter, settings, num_nvl_bytes)
        if device.type != "cuda" and not settings.nvlink_emulate:
            raise DeepEPError(
                "backend='nvlink' needs an NCCL group on CUDA devices (on CPU ranks it runs only emulated, for "
                "tests: DEEP_EP_NVLINK_EMULATE=1)"
            )
        nbytes = self.num_nvl_bytes or (DEFAULT_STAGING_BYTES if device.type == "cuda" else EMULATED_STAGING_BYTES)
        sizes: List[Any] = [None] * self.num_ranks  # symmetric memory needs one size on every rank
        dist.all_gather_object(sizes, nbytes, group=group)
        if len(set(sizes)) > 1:
            log.warning("deep_ep nvlink: num_nvl_bytes differs between ranks (%s); using the smallest", sizes)
            nbytes = min(sizes)
        self.meta_bytes = 2 * self.num_ranks * _META_SLOT * 8
        if nbytes <= self.meta_bytes + 2 * _ALIGN:
            raise DeepEPInputError(
                f"num_nvl_bytes={nbytes} is too small for the nvlink transport "
                f"(needs more than {self.meta_bytes + 2 * _ALIGN} bytes)"
            )
        self.nbytes = _align(nbytes)
        self.fused_reserve_bytes = fused_control_bytes(self.num_ranks)
        if nbytes <= self.meta_bytes + self.fused_reserve_bytes + 2 * _ALIGN:
            raise DeepEPInputError(
                f"num_nvl_bytes={nbytes} is too small for the nvlink transport "
                f"(needs more than {self.meta_bytes + self.fused_reserve_bytes + 2 * _ALIGN} bytes)"
            )
        self.sym = make_symmetric(group, device, self.nbytes, self.timeout_s, settings.nvlink_emulate)
        self._use_staging(self.sym.peers)
        self._device_setup()
        self._pinned: Optional[torch.Tensor] = None
        cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device=device) if cuda else None
        # Copies to / from different peers run on their own streams (the copy engines work on several
        # links at once); with one peer there is nothing to spread.
        self.peer_streams = (
            [torch.cuda.Stream(device=device) for _ in range(min(self.num_ranks - 1, 7))]
            if self.num_ranks > 2 and cuda
            else []
        )
        self.pull_sm = settings.nvlink_pull == "gather"
        self.chunks = settings.nvlink_chunks
        self.min_chunk_bytes = MIN_CHUNK_BYTES
        self.push = settings.nvlink_dispatch == "push"
        self.push_chunks = settings.nvlink_push_chunks
        fused_asked = int(settings.nvlink_path == "fused")
        theirs = self.all_gather_ints(
            torch.tensor([self.chunks, int(self.push), self.push_chunks, fused_asked]), "nvlink setup"
        ).tolist()
        if any(t != theirs[0] for t in theirs):
            raise DeepEPInputError(
                f"DEEP_EP_NVLINK_CHUNKS / DEEP_EP_NVLINK_DISPATCH / DEEP_EP_NVLINK_PUSH_CHUNKS / DEEP_EP_NVLINK_PATH "
                f"differ between ranks ({theirs}); set them the same everywhere"
            )
        self._fused_setup()
        ready = self.all_gather_ints(torch.tensor([int(self.fused_ready)]), "nvlink setup").tolist()
        self.fused_plans = all(r[0] for r in ready)  # every rank has the kernels, or none takes the path

    def _join(self) -> None:
        """Make the current stream wait for the side stream (call before returning or the next phase)."""
        if self.side is not None and self._pipelined:
            torch.cuda.current_stream().wait_stream(self.side)

    def _side(self):
        """Context running on the side stream, after what the current stream has queued; inline when the
        call is not pipelined (one chunk: the side stream only adds host work, measured slower)."""
        if self.side is None or not self._pipelined:
            return contextlib.nullcontext()
        self.side.wait_stream(torch.cuda.current_stream())
        return torch.cuda.stream(self.side)

    def _peer_stream(self, i: int, n: int):
        """Context for the ``i``-th of ``n`` copies to or from different peers: its own stream (after
        the current one) when there are several, else inline."""
        if n < 2 or not self.peer_streams:
            return contextlib.nullcontext()
        st = self.peer_streams[i % len(self.peer_streams)]
        st.wait_stream(torch.cuda.current_stream())
        return torch.cuda.stream(st)

    def _join_peers(self, n: int) -> None:
        """The current stream waits for the peer streams used by ``n`` copies."""
        if n < 2 or not self.peer_streams:
            return
        cur = torch.cuda.current_stream()
        for st in self.peer_streams[:n]:
            cur.wait_stream(st)

    def _iota(self, n: int) -> torch.Tensor:
        """``arange(n)`` on the device, from one cached tensor."""
        t = getattr(self, "_iota_t", None)
        if t is None or t.numel() < n:
            t = self._iota_t = torch.arange(max(n, 1024), device=self.peers[self.rank].device)
        return t[:n]

    def _end_call(self, had_phases: bool) -> None:
        """Close a call. Under CUDA-graph capture the call was bracketed by barriers: one before its
        first write (whatever ran before a replay has finished reading) and this one after its last
        read (whatever runs after a replay may write), because a replay does not advance the host-side
        phase state that otherwise orders the halves."""
        if self._graph and had_phases:
            self._barrier()
        self._graph = False

    def _mark(self):
        """An event on the current stream (``None`` when inline)."""
        if self.side is None or not self._pipelined:
            return None
        ev = torch.cuda.Event()
        ev.record()
        return ev

    def _wait(self, ev) -> None:
        if ev is not None:
            torch.cuda.current_stream().wait_event(ev)

    def _use_staging(self, peers: List[torch.Tensor]) -> None:
        """Take ``peers[p]``, rank ``p``'s staging as this rank sees it, and split off the two data halves."""
        self.peers = peers
        self.half_bytes = (self.nbytes - self.meta_bytes - self.fused_reserve_bytes) // 2 // _ALIGN * _ALIGN
        self.halves = [self.meta_bytes, self.meta_bytes + self.half_bytes]
        self.phase = 0
        self._fence = False
        self._dirty = False
        self._pipelined = False
        self._graph = False
        self.meta_seq = 0

    # ---------------------------------------------------------------- helpers
    def _barrier(self) -> None:
        self.sym.barrier()

    def _begin_phase(self, full: bool) -> int:
        """Start a phase; returns the byte offset of the data area it writes.

        A half phase takes the halves in turn. A full phase (one round of a call
        that fits the whole data area but not a half) first passes a barrier, so
        nobody still reads either half, and makes the next phase do the same.
        """
        if full or self._fence or self._graph:
            self._barrier()
        self._fence = full
        self._dirty = True  # a fused kernel after this passes a barrier first (FusedPath._clean)
        if full:
            return self.halves[0]
        start = self.halves[self.phase % 2]
        self.phase += 1
        return start

    def _meta(self, peer: int, parity: int) -> torch.Tensor:
        start = parity * self.num_ranks * _META_SLOT * 8
        return (
            self.peers[peer][start : start + self.num_ranks * _META_SLOT * 8]
            .view(torch.int64)
            .view(self.num_ranks, _META_SLOT)
        )

    def _region(self, peer: int, start: int, rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """``rows`` rows of ``width`` bytes of ``peer``'s staging at byte ``start``, as ``dtype`` words."""
        return self.peers[peer][start : start + rows * width].view(rows, width).view(dtype)

    def _views(self, sched: Dict[str, Any], start: int, make) -> Any:
        """Views of the staging for a phase at ``start``, made once per schedule and start."""
        views = sched["views"].get(start)
        if views is None:
            views = sched["views"][start] = make(start)
        return views

    # ---------------------------------------------------------------- metadata
    def _check_meta_len(self, n: int) -> None:
        if n > _META_SLOT:
            raise DeepEPInputError(
                f"metadata of {n} ints exceeds the nvlink metadata slot ({_META_SLOT}); "
                f"num_experts is too large for this transport"
            )

    def all_gather_ints(self, values: torch.Tensor, stage: str) -> torch.Tensor:
        values = values.to(device=self.device, dtype=torch.int64).reshape(-1)
        n = values.numel()
        mine = self.publish_meta(values)
        if not mine.is_cuda:  # (the emulation: the barrier already waited)
            return mine.clone()
        if self._pinned is None:
            self._pinned = torch.empty((self.num_ranks * _META_SLOT,), dtype=torch.int64, device="cpu").pin_memory()
        host = self._pinned[: self.num_ranks * n].view(self.num_ranks, n)
        host.copy_(mine.contiguous(), non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self.waiter.wait(_EventWork(ev), stage)
        return host.clone()

    # ---------------------------------------------------------------- dispatch
    def dispatch(
        self, plan: Plan, rows: Sequence[torch.Tensor], alloc: Alloc, codec=None, num_sms: int = 20
    ) -> List[torch.Tensor]:
        """Move ``rows`` by ``plan``. With ``codec`` (the Buffer's wire compression) ``rows[0]`` is the raw
        ``[T, H]`` input: each chunk is encoded straight into this rank's staging as it is packed (one
        kernel: gather + encode), and the rows pulled from each peer are decoded into the returned
        ``rows[0]`` right after their copy (on the same stream, so it overlaps the next pulls and packs);
        this rank's own rows take the round trip. The device path (``num_worst_tokens``) encodes first
        and decodes after."""
        if codec is not None and plan.device is not None:
            return super().dispatch_encoded(plan, rows, alloc, codec, num_sms=num_sms)
        if plan.device is not None:
            return self._device_dispatch(plan, rows, alloc, _words, num_sms)
        if plan.counts is None:
            raise DeepEPError("the nvlink transport needs the counts matrix in the plan")
        if self.push and codec is None and rows and not self.pull_sm:
            src = [_words(t) for t in rows]
            psched = self._push_schedule(plan, tuple(t.size(1) * t.element_size() for t in src))
            if psched is not None:
                return self._push_dispatch(plan, psched, rows, src, alloc)
        x0 = final = None
        if codec is not None:
            x0 = rows[0].contiguous()
            rows = [torch.empty((0, codec.row_bytes), dtype=torch.uint8, device=x0.device)] + list(rows[1:])
            final = alloc((plan.num_out_rows, x0.size(1)), x0.dtype)
            if plan.num_out_rows > plan.num_recv_tokens:
                final[plan.num_recv_tokens :].zero_()
        # with a codec, outs[0] holds the encoded rows as pulled: a temporary of this (comm) stream, never made
        # with ``alloc`` (compute-stream memory freed while this stream's decode is queued could be reused)
        if codec is not None:
            enc = self.stream_alloc((plan.num_out_rows, codec.row_bytes), torch.uint8)
            outs = [enc] + alloc_outputs(plan, rows[1:], alloc)
        else:
            outs = alloc_outputs(plan, rows, alloc)
        if not rows:
            return outs
        src = [_words(t) for t in rows]  # (with a codec, src[0] gives only the encoded width)
        dst = [_words(o) for o in outs]
        widths = tuple(t.size(1) * t.element_size() for t in src)
        sched = self._dispatch_schedule(plan, widths)
        offsets, me, steps = sched["offsets"], self.rank, sched["steps"]
        self._pipelined = len(steps) == 1 and len(steps[0]) > 1
        self._graph = _capturing()

        def make(start):  # [round][chunk] -> (pack views, pull views)
            out = []
            for chunks in steps:
                views = []
                for tok, at, pulls in chunks:
                    packs = (
                        [
                            self._region(me, start + o + at * w, tok.numel(), w, sw.dtype)
                            for sw, w, o in zip(src, widths, offsets)
                        ]
                        if tok is not None
                        else None
                    )
                    reads = [
                        [self._region(s, start + o + a * w, n, w, sw.dtype) for sw, w, o in zip(src, widths, offsets)]
                        for s, a, n, _ in pulls
                    ]
                    views.append((packs, reads))
                out.append(views)
            return out

        if sched["local"] is not None:  # my rows for myself, beside the packing
            tok, first, n = sched["local"]
            with self._side():
                for i, (sw, ow) in enumerate(zip(src, dst)):
                    if i == 0 and codec is not None:
                        codec.decode(codec.encode(x0, index=tok), x0.dtype, out=final[first : first + n])
                    else:
                        torch.index_select(sw, 0, tok, out=ow[first : first + n])
        for r, chunks in enumerate(steps):
            start = self._begin_phase(sched["full"])
            views = self._views(sched, start, make)[r]
            for (tok, _, pulls), (packs, reads) in zip(chunks, views):
                if tok is not None:  # pack what I send into my own staging
                    for i, (sw, pv) in enumerate(zip(src, packs)):
                        if i == 0 and codec is not None:
                            codec.encode(x0, index=tok, out=pv.view(torch.uint8))
                        else:
                            torch.index_select(sw, 0, tok, out=pv)
                self._barrier()  # this chunk is packed on every rank
                with self._side():  # read my rows out of each peer's staging
                    for i, ((_s, _a, n, first), rv) in enumerate(zip(pulls, reads)):
                        with self._peer_stream(i, len(pulls)):
                            for ow, v in zip(dst, rv):
                                if self.pull_sm:  # SM loads over NVLink instead of the copy engine
                                    torch.index_select(v, 0, self._iota(n), out=ow[first : first + n])
                                else:
                                    ow[first : first + n].copy_(v)
                            if codec is not None and n:
                                codec.decode(outs[0][first : first + n], x0.dtype, out=final[first : first + n])
                    self._join_peers(len(pulls))
            self._join()  # reads done before this rank's next barrier
        self._join()
        self._end_call(bool(steps))
        return outs if codec is None else [final] + outs[1:]

    def dispatch_encoded(
        self, plan: Plan, rows: Sequence[torch.Tensor], alloc: Alloc, codec, num_sms: int = 20
    ) -> List[torch.Tensor]:
        """Encoding fused into packing, decoding into pulling (see :meth:`dispatch`)."""
        return self.dispatch(plan, rows, alloc, codec=codec, num_sms=num_sms)

    def _push_dispatch(
        self, plan: Plan, sched: Dict[str, Any], rows: Sequence[torch.Tensor], src: List[torch.Tensor], alloc: Alloc
    ) -> List[torch.Tensor]:
        """A dispatch by copies of token runs into the receivers' staging (see :meth:`_push_schedule`);
        ``src`` are ``rows`` as integer words."""
        outs = alloc_outputs(plan, rows, alloc)
        dst = [_words(o) for o in outs]
        widths = tuple(t.size(1) * t.element_size() for t in src)
        offsets, me, chunks = sched["offsets"], self.rank, sched["chunks"]
        self._pipelined = len(chunks) > 1
        self._graph = _capturing()
        if sched["local"] is not None:  # my rows for myself, beside the copies
            tok, first, n = sched["local"]
            with self._side():
                for sw, ow in zip(src, dst):
                    torch.index_select(sw, 0, tok, out=ow[first : first + n])
        start = self._begin_phase(sched["full"])
        for copies, pulls in chunks:
            for d, t0, n, row in copies:  # runs of my tokens straight into d's staging
                for sw, w, o in zip(src, widths, offsets):
                    self._region(d, start + o + row * w, n, w, sw.dtype).copy_(sw[t0 : t0 + n])
            self._barrier()  # this chunk has landed everywhere
            with self._side():  # copy it out of my staging, beside the next copies
                for row, n, first in pulls:
                    for sw, ow, w, o in zip(src, dst, widths, offsets):
                        ow[first : first + n].copy_(self._region(me, start + o + row * w, n, w, sw.dtype))
        self._join()
        self._end_call(True)
        return outs

    # ---------------------------------------------------------------- combine
    def combine(
        self,
        plan: Plan,
        x: torch.Tensor,
        weights: Optional[torch.Tensor],
        biases: Sequence[torch.Tensor],
        alloc: Alloc,
        codec=None,
        num_sms: int = 20,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        me = self.rank
        n_recv = plan.num_recv_tokens
        if plan.device is not None:  # rows beyond the real ones are never read
            srcs = [x if codec is None else codec.encode(x)]
            if weights is not None:
                srcs.append(weights.float().contiguous())
            return self._device_combine(plan, srcs, biases, alloc, x.dtype, _words, codec, num_sms)
        srcs = [x[:n_recv] if codec is None else codec.encode(x[:n_recv])]
        if weights is not None:
            srcs.append(weights[:n_recv].float().contiguous())
        src = [_words(t) for t in srcs]
        widths = tuple(t.size(1) * t.element_size() for t in src)
        sched = self._combine_schedule(plan, widths)
        offsets, n_back, steps = sched["offsets"], sched["n_back"], sched["steps"]
        single = len(steps) == 1
        self._pipelined = single and len(steps[0][0]) > 1
        self._graph = _capturing()

        def make(start):  # [round] -> ([chunk][push] -> views, my area per tensor as raw rows)
            out = []
            for chunks, n_in in steps:
                writes = [
                    [
                        [self._region(s, start + o + a * w, n, w, sw.dtype) for sw, w, o in zip(src, widths, offsets)]
                        for s, a, n, _ in pushes
                    ]
                    for pushes in chunks
                ]
                mine = [
                    self._region(me, start + o, n_back if single else n_in, w, torch.uint8)
                    for w, o in zip(widths, offsets)
                ]
                out.append((writes, mine))
            return out

        if not single:  # rounds: collect the rows, then reduce
            backs = [torch.empty((n_back, t.size(1)), dtype=t.dtype, device=x.device) for t in srcs]
            for r, (chunks, n_in) in enumerate(steps):
                start = self._begin_phase(sched["full"])
                writes, mine = self._views(sched, start, make)[r]
                for pushes, wvs in zip(chunks, writes):
                    for i, ((_s, _a, n, first), wv) in enumerate(zip(pushes, wvs)):
                        with self._peer_stream(i, len(pushes)):
                            for sw, v in zip(src, wv):
                                v.copy_(sw[first : first + n])
                    self._join_peers(len(pushes))
                self._barrier()
                if n_in:
                    lo = r * sched["cap"]
                    for bk, m in zip(backs, mine):
                        as_bytes(bk[lo : lo + n_in]).copy_(m)
            backs, srcs = _decoded(codec, backs, srcs, x.dtype)
            out = self._reduce(plan, sched, backs, srcs, biases, alloc, x.dtype, weights is not None, None)
            self._end_call(True)
            return out
        events = []
        if steps:
            start = self._begin_phase(sched["full"])
            writes, mine = self._views(sched, start, make)[0]
            with self._side():  # stores into the sources' staging
                for pushes, wvs in zip(steps[0][0], writes):
                    for i, ((_s, _a, n, first), wv) in enumerate(zip(pushes, wvs)):
                        with self._peer_stream(i, len(pushes)):
                            for sw, v in zip(src, wv):
                                v.copy_(sw[first : first + n])
                    self._join_peers(len(pushes))
                    self._barrier()  # this chunk has landed everywhere
                    events.append(self._mark())
            backs = [m.view(t.dtype).view(n_back, t.size(1)) for m, t in zip(mine, srcs)]
        else:
            backs = [t[:0] for t in srcs]
        if codec is not None:  # decode everything first: reduce once all rows are here
            if events:
                self._wait(events[-1])
            events = None
            backs, srcs = _decoded(codec, backs, srcs, x.dtype)
        out = self._reduce(plan, sched, backs, srcs, biases, alloc, x.dtype, weights is not None, events)
        self._join()
        self._end_call(bool(steps))
        return out

    def _reduce(
        self,
        plan: Plan,
        sched: Dict[str, Any],
        backs: List[torch.Tensor],
        srcs: List[torch.Tensor],
        biases: Sequence[torch.Tensor],
        alloc: Alloc,
        dtype: torch.dtype,
        has_w: bool,
        events: Optional[list],
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Reduce every token, chunk by chunk as its rows arrive (``events[c]``) when given."""
        me, pos, T = self.rank, sched["pos"], plan.num_tokens
        if not events or len(events) == 1:
            if events:
                self._wait(events[0])
            out = reduce_rows(backs[0], pos, biases, dtype, alloc, local=srcs[0], local_col=me)
            out_w = reduce_rows(backs[1], pos, (), torch.float32, alloc, local=srcs[1], local_col=me) if has_w else None
            return out, out_w
        out = alloc((T, backs[0].size(1)), dtype)
        out_w = alloc((T, backs[1].size(1)), torch.float32) if has_w else None
        t0 = 0
        for ev, t1 in zip(events, sched["ready"]):
            self._wait(ev)
            if t1 <= t0:
                continue
            for res, back, src, bs, dt in (
                (out, backs[0], srcs[0], [b[t0:t1] for b in biases], dtype),
                (out_w, backs[1] if has_w else None, srcs[1] if has_w else None, [], torch.float32),
            ):
                if res is None:
                    continue
                part = res[t0:t1]
                got = reduce_rows(back, pos[t0:t1], bs, dt, lambda shape, d, part=part: part, local=src, local_col=me)
                if got.data_ptr() != part.data_ptr():
                    part.copy_(got)
            t0 = t1
        return out, out_w

    def low_latency_engine(self, min_bytes: int):
        """The low-latency kernel engine (:class:`~deep_ep.transport.nvlink.low_latency.NVLinkLowLatency`) where Triton
        runs on this device, else ``None`` (low-latency calls then take the pair dispatch)."""
        from ... import kernels

        if not kernels.available_on(self.device):
            return None
        from .low_latency import NVLinkLowLatency

        return NVLinkLowLatency(self, min_bytes)

    def destroy(self) -> None:
        """Drop the staging and its peers' views (the symmetric memory is freed with them)."""
        self.peers = []
        self.sym.destroy()
