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
  a copy-out, measured on 2 x H200 by ``scripts/nvlink_pipeline_probe.py``).
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
local gather (``index_select``) and the reduction kernel.

Everything that depends only on the layout (windows, offsets, index slices,
reduction positions) is computed once per handle and kept in the plan, so a
cached dispatch or a combine only launches copies.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .. import layout
from ..errors import DeepEPError, DeepEPInputError
from .base import Alloc, Plan, Transport, Waiter, alloc_outputs, as_bytes, reduce_rows, send_token_order

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
    if t.dim() == 2 and t.is_contiguous() and t.size(1) > 0:
        try:
            return t.view(_word(t.size(1) * t.element_size()))   # one view for the common [N, H] case
        except RuntimeError:
            pass                                                  # storage offset not word aligned
    b = as_bytes(t)
    return b.view(_word(b.size(1)))


#: chunks a one-round call is pipelined in (each a barrier), env ``DEEP_EP_NVLINK_CHUNKS``. One: on
#: 2 x H200 the torch-op path is bound by host time, and chunks (more launches, a side stream) made
#: the normal workload slower (docs/perf-notes.md).
DEFAULT_CHUNKS = 1
#: smallest chunk worth a barrier (bytes of the longest sequence of rows a rank sends)
MIN_CHUNK_BYTES = 4 << 20


def _chunk_setting() -> int:
    raw = os.environ.get("DEEP_EP_NVLINK_CHUNKS", "")
    try:
        k = int(raw) if raw else DEFAULT_CHUNKS
    except ValueError:
        raise DeepEPInputError(f"DEEP_EP_NVLINK_CHUNKS must be an int >= 1, got {raw!r}") from None
    if k < 1:
        raise DeepEPInputError(f"DEEP_EP_NVLINK_CHUNKS must be an int >= 1, got {raw!r}")
    return k


def _capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph."""
    try:
        return torch.cuda.is_current_stream_capturing()
    except Exception:  # pragma: no cover - no CUDA
        return False


def _not_while_capturing(op: str) -> None:
    if _capturing():
        raise DeepEPError(f"deep_ep nvlink: this {op} (handle and row shapes) has not run before; run it once "
                          f"outside CUDA-graph capture (a warm-up), then capture it")


def _split(n: int, k: int) -> List[int]:
    """Bounds of ``k`` near-equal parts of ``range(n)``."""
    return [n * c // k for c in range(k + 1)]


class _EventWork:
    """Adapts a CUDA event to the ``is_completed`` / ``wait`` protocol of :class:`Waiter`."""

    def __init__(self, event: torch.cuda.Event) -> None:
        self.event = event

    def is_completed(self) -> bool:
        return self.event.query()

    def wait(self) -> None:
        self.event.synchronize()


def _windows(counts: List[List[int]], R: int, cap: int) -> Tuple[List[List[int]], int]:
    """Offsets of each rank's non-self rows, destination-major, and the number of rounds.

    ``off[s][d]`` is where the rows ``s`` sends to ``d != s`` start in ``s``'s
    sequence of non-self rows; a round covers ``cap`` rows of every sequence.
    """
    off, longest = [], 0
    for s in range(R):
        row, acc = [], 0
        for d in range(R):
            row.append(acc)
            if d != s:
                acc += counts[s][d]
        off.append(row)
        longest = max(longest, acc)
    return off, (longest + cap - 1) // cap if longest else 0


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
        sizes: List[Any] = [None] * self.num_ranks      # symmetric memory needs one size on every rank
        dist.all_gather_object(sizes, nbytes, group=group)
        if len(set(sizes)) > 1:
            log.warning("deep_ep nvlink: num_nvl_bytes differs between ranks (%s); using the smallest", sizes)
            nbytes = min(sizes)
        self.meta_bytes = 2 * self.num_ranks * _META_SLOT * 8
        if nbytes <= self.meta_bytes + 2 * _ALIGN:
            raise DeepEPInputError(f"num_nvl_bytes={nbytes} is too small for the nvlink transport "
                                   f"(needs more than {self.meta_bytes + 2 * _ALIGN} bytes)")
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
        self._use_staging([self.hdl.get_buffer(p, (self.nbytes,), torch.uint8, 0) for p in range(self.num_ranks)])
        self._barrier_ms = int(timeout_s * 1000) + 10_000   # the host gives up first, with a better message
        self._pinned: Optional[torch.Tensor] = None
        self.side = torch.cuda.Stream(device=device)
        self.pull_sm = os.environ.get("DEEP_EP_NVLINK_PULL", "copy") == "gather"
        self.chunks = _chunk_setting()
        self.min_chunk_bytes = MIN_CHUNK_BYTES
        theirs = self.all_gather_ints(torch.tensor([self.chunks]), "nvlink setup")[:, 0].tolist()
        if len(set(theirs)) != 1:
            raise DeepEPInputError(f"DEEP_EP_NVLINK_CHUNKS differs between ranks ({theirs}); set it the same everywhere")

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
        self.half_bytes = (self.nbytes - self.meta_bytes) // 2 // _ALIGN * _ALIGN
        self.halves = [self.meta_bytes, self.meta_bytes + self.half_bytes]
        self.phase = 0
        self._fence = False
        self._pipelined = False
        self._graph = False
        self.meta_seq = 0

    # ---------------------------------------------------------------- helpers
    def _barrier(self) -> None:
        self.hdl.barrier(channel=0, timeout_ms=self._barrier_ms)

    def _begin_phase(self, full: bool) -> int:
        """Start a phase; returns the byte offset of the data area it writes.

        A half phase takes the halves in turn. A full phase (one round of a call
        that fits the whole data area but not a half) first passes a barrier, so
        nobody still reads either half, and makes the next phase do the same.
        """
        if full or self._fence or self._graph:
            self._barrier()
        self._fence = full
        if full:
            return self.halves[0]
        start = self.halves[self.phase % 2]
        self.phase += 1
        return start

    def _meta(self, peer: int, parity: int) -> torch.Tensor:
        start = parity * self.num_ranks * _META_SLOT * 8
        return self.peers[peer][start:start + self.num_ranks * _META_SLOT * 8].view(torch.int64).view(
            self.num_ranks, _META_SLOT)

    def _region(self, peer: int, start: int, rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """``rows`` rows of ``width`` bytes of ``peer``'s staging at byte ``start``, as ``dtype`` words."""
        return self.peers[peer][start:start + rows * width].view(rows, width).view(dtype)

    def _layout(self, widths: Sequence[int], area: int = 0) -> Tuple[int, List[int]]:
        """Rows per round and each tensor's region offset, for rows of byte ``widths`` in ``area`` bytes
        (a half by default)."""
        area = area or self.half_bytes
        per_row = sum(widths)
        cap = (area - _ALIGN * len(widths)) // max(per_row, 1)
        if cap < 1:
            raise DeepEPInputError(
                f"the nvlink staging buffer ({self.nbytes} bytes, two halves of {self.half_bytes}) cannot hold "
                f"one row of {per_row} bytes; pass num_nvl_bytes >= "
                f"{self.meta_bytes + 2 * (_ALIGN * (len(widths) + 1) + per_row)}")
        while True:
            offsets, off = [], 0
            for w in widths:
                offsets.append(off)
                off = _align(off + cap * w)
            if off <= area:
                return cap, offsets
            cap -= 1                       # alignment padding pushed past the end: one row fewer

    def _rounds(self, C: List[List[int]], widths: Sequence[int]):
        """``(full, cap, offsets, off, rounds)``: halves in turn, or the whole data area for a call that
        fits it in one round but not a half."""
        cap, offsets = self._layout(widths)
        off, rounds = _windows(C, self.num_ranks, cap)
        if rounds > 1:
            cap_f, offsets_f = self._layout(widths, 2 * self.half_bytes)
            off_f, rounds_f = _windows(C, self.num_ranks, cap_f)
            if rounds_f == 1:
                return True, cap_f, offsets_f, off_f, 1
        return False, cap, offsets, off, rounds

    def _views(self, sched: Dict[str, Any], start: int, make) -> Any:
        """Views of the staging for a phase at ``start``, made once per schedule and start."""
        views = sched["views"].get(start)
        if views is None:
            views = sched["views"][start] = make(start)
        return views

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
    def _chunks_for(self, C: List[List[int]], widths: Sequence[int], rounds: int) -> int:
        """Chunks a call is pipelined in: several for one big round, else one (same on every rank)."""
        if rounds != 1:
            return 1
        longest = max(sum(C[s][d] for d in range(self.num_ranks) if d != s) for s in range(self.num_ranks))
        return max(1, min(self.chunks, longest * sum(widths) // max(self.min_chunk_bytes, 1)))

    def _dispatch_schedule(self, plan: Plan, widths: Tuple[int, ...]) -> Dict[str, Any]:
        """What a dispatch of ``plan`` with rows of byte ``widths`` does, computed once per plan.

        ``steps[r]`` lists round ``r``'s chunks ``(token ids to pack, pulls)``; a pull
        ``(s, a, n, first)`` copies ``n`` rows from position ``a`` of rank ``s``'s staging
        window to output row ``first``.
        """
        key = ("nvlink_dispatch", widths)
        sched = plan.extra.get(key)
        if sched is not None:
            return sched
        _not_while_capturing("dispatch")
        R, me = self.num_ranks, self.rank
        C = plan.counts.tolist()
        full, cap, offsets, off, rounds = self._rounds(C, widths)
        k = self._chunks_for(C, widths, rounds)
        idx = send_token_order(plan)
        starts = [0]
        for c in plan.send_counts:
            starts.append(starts[-1] + c)
        recv_first = [sum(C[s2][me] for s2 in range(s)) for s in range(R)]   # my rows from s start here
        c_me = C[me][me]
        local = (idx[starts[me]:starts[me] + c_me], recv_first[me], c_me) if c_me else None
        nonself = torch.cat([idx[starts[d]:starts[d + 1]] for d in range(R) if d != me]) if R > 1 else idx[:0]
        length = [sum(C[s][d] for d in range(R) if d != s) for s in range(R)]
        steps = []
        for r in range(rounds):
            lo, hi = r * cap, (r + 1) * cap
            # Chunk c of round r covers [lo + b_s[c], lo + b_s[c + 1]) of rank s's sequence.
            bounds = [_split(max(min(length[s], hi) - lo, 0), k) for s in range(R)]
            chunks = []
            for c in range(k):
                a_me, b_me = lo + bounds[me][c], lo + bounds[me][c + 1]
                pulls = []
                for s in range(R):
                    if s == me or not C[s][me]:
                        continue
                    a = max(off[s][me], lo + bounds[s][c])
                    b = min(off[s][me] + C[s][me], lo + bounds[s][c + 1])
                    if a < b:
                        pulls.append((s, a - lo, b - a, recv_first[s] + a - off[s][me]))
                chunks.append((nonself[a_me:b_me] if b_me > a_me else None, a_me - lo, pulls))
            steps.append(chunks)
        sched = dict(full=full, cap=cap, offsets=offsets, local=local, steps=steps, views={})
        plan.extra[key] = sched
        return sched

    def dispatch(self, plan: Plan, rows: Sequence[torch.Tensor], alloc: Alloc) -> List[torch.Tensor]:
        if plan.counts is None:
            raise DeepEPError("the nvlink transport needs the counts matrix in the plan")
        outs = alloc_outputs(plan, rows, alloc)
        if not rows:
            return outs
        src = [_words(t) for t in rows]
        dst = [_words(o) for o in outs]
        widths = tuple(t.size(1) * t.element_size() for t in src)
        sched = self._dispatch_schedule(plan, widths)
        offsets, me, steps = sched["offsets"], self.rank, sched["steps"]
        self._pipelined = len(steps) == 1 and len(steps[0]) > 1
        self._graph = _capturing()

        def make(start):                          # [round][chunk] -> (pack views, pull views)
            out = []
            for chunks in steps:
                views = []
                for tok, at, pulls in chunks:
                    packs = [self._region(me, start + o + at * w, tok.numel(), w, sw.dtype)
                             for sw, w, o in zip(src, widths, offsets)] if tok is not None else None
                    reads = [[self._region(s, start + o + a * w, n, w, sw.dtype)
                              for sw, w, o in zip(src, widths, offsets)] for s, a, n, _ in pulls]
                    views.append((packs, reads))
                out.append(views)
            return out

        if sched["local"] is not None:          # my rows for myself, beside the packing
            tok, first, n = sched["local"]
            with self._side():
                for sw, ow in zip(src, dst):
                    torch.index_select(sw, 0, tok, out=ow[first:first + n])
        for r, chunks in enumerate(steps):
            start = self._begin_phase(sched["full"])
            views = self._views(sched, start, make)[r]
            for (tok, _, pulls), (packs, reads) in zip(chunks, views):
                if tok is not None:                  # pack what I send into my own staging
                    for sw, pv in zip(src, packs):
                        torch.index_select(sw, 0, tok, out=pv)
                self._barrier()                      # this chunk is packed on every rank
                with self._side():                   # read my rows out of each peer's staging
                    for (s, a, n, first), rv in zip(pulls, reads):
                        for ow, v in zip(dst, rv):
                            if self.pull_sm:             # SM loads over NVLink instead of the copy engine
                                torch.index_select(v, 0, self._iota(n), out=ow[first:first + n])
                            else:
                                ow[first:first + n].copy_(v)
            self._join()                             # reads done before this rank's next barrier
        self._join()
        self._end_call(bool(steps))
        return outs

    # ---------------------------------------------------------------- combine
    def _combine_schedule(self, plan: Plan, widths: Tuple[int, ...]) -> Dict[str, Any]:
        """What a combine of ``plan`` with rows of byte ``widths`` does, computed once per plan.

        ``steps[r]`` lists round ``r``'s chunks ``(pushes, rows that arrive)``; a push
        ``(s, a, n, first)`` copies my rows ``first..first+n`` to position ``a`` of rank
        ``s``'s window. ``ready[c]`` is the first token not complete after chunk ``c``
        (one-round calls).
        """
        key = ("nvlink_combine", widths)
        sched = plan.extra.get(key)
        if sched is not None:
            return sched
        _not_while_capturing("combine")
        R, me = self.num_ranks, self.rank
        C = plan.counts.tolist()
        full, cap, offsets, off, rounds = self._rounds(C, widths)
        k = self._chunks_for(C, widths, rounds)
        recv_first = [sum(C[s2][me] for s2 in range(s)) for s in range(R)]
        n_back = off[me][R - 1] + (C[me][R - 1] if R - 1 != me else 0)    # non-self rows that come back to me
        steps = []
        for r in range(rounds):
            lo, hi = r * cap, (r + 1) * cap
            chunks = []
            for c in range(k):
                pushes = []
                for s in range(R):                   # my rows from s go back into s's staging
                    if s == me or not C[s][me]:
                        continue
                    part = _split(C[s][me], k)
                    a = max(off[s][me] + part[c], lo)
                    b = min(off[s][me] + part[c + 1], hi)
                    if a < b:
                        pushes.append((s, a - lo, b - a, recv_first[s] + a - off[s][me]))
                chunks.append(pushes)
            steps.append((chunks, max(min(n_back, hi) - lo, 0)))
        ready = [plan.num_tokens] * k
        if rounds == 1 and k > 1:
            # After chunk c, rank j has returned the first split(C[me][j])[c + 1] of my rows to it; my
            # tokens before the first one still missing are complete.
            idx = send_token_order(plan)
            starts = [0]
            for cnt in plan.send_counts:
                starts.append(starts[-1] + cnt)
            want = []
            for c in range(k - 1):
                for j in range(R):
                    b = _split(C[me][j], k)[c + 1]
                    if j != me and b < C[me][j]:
                        want.append((c, starts[j] + b))
            if want:
                toks = idx[torch.tensor([w for _, w in want], dtype=torch.int64).to(idx.device)].tolist()
                for (c, _), t in zip(want, toks):
                    ready[c] = min(ready[c], int(t))
            for c in range(k - 2, -1, -1):
                ready[c] = min(ready[c], ready[c + 1])
        # Where each (token, rank) row is found: rank me's in the input x, the others' in the rows that
        # came back (my non-self send order), -1 where the token did not go.
        slots = layout.token_slots(plan.is_token_in_rank).to(torch.int64)
        base = [recv_first[me] if j == me else off[me][j] for j in range(R)]
        base_t = torch.tensor(base, dtype=torch.int64).to(slots.device)
        pos = torch.where(slots >= 0, slots + base_t, torch.full_like(slots, -1)).contiguous()
        sched = dict(full=full, cap=cap, offsets=offsets, steps=steps, n_back=n_back, pos=pos, ready=ready,
                     views={})
        plan.extra[key] = sched
        return sched

    def combine(self, plan: Plan, x: torch.Tensor, weights: Optional[torch.Tensor],
                biases: Sequence[torch.Tensor], alloc: Alloc) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        me = self.rank
        n_recv = plan.num_recv_tokens
        srcs = [x[:n_recv]]
        if weights is not None:
            srcs.append(weights[:n_recv].float().contiguous())
        src = [_words(t) for t in srcs]
        widths = tuple(t.size(1) * t.element_size() for t in src)
        sched = self._combine_schedule(plan, widths)
        offsets, n_back, steps = sched["offsets"], sched["n_back"], sched["steps"]
        single = len(steps) == 1
        self._pipelined = single and len(steps[0][0]) > 1
        self._graph = _capturing()

        def make(start):              # [round] -> ([chunk][push] -> views, my area per tensor as raw rows)
            out = []
            for chunks, n_in in steps:
                writes = [[[self._region(s, start + o + a * w, n, w, sw.dtype) for sw, w, o in zip(src, widths, offsets)]
                           for s, a, n, _ in pushes] for pushes in chunks]
                mine = [self._region(me, start + o, n_back if single else n_in, w, torch.uint8)
                        for w, o in zip(widths, offsets)]
                out.append((writes, mine))
            return out

        if not single:                                           # rounds: collect the rows, then reduce
            backs = [torch.empty((n_back, t.size(1)), dtype=t.dtype, device=x.device) for t in srcs]
            for r, (chunks, n_in) in enumerate(steps):
                start = self._begin_phase(sched["full"])
                writes, mine = self._views(sched, start, make)[r]
                for pushes, wvs in zip(chunks, writes):
                    for (s, a, n, first), wv in zip(pushes, wvs):
                        for sw, v in zip(src, wv):
                            v.copy_(sw[first:first + n])
                self._barrier()
                if n_in:
                    lo = r * sched["cap"]
                    for bk, m in zip(backs, mine):
                        as_bytes(bk[lo:lo + n_in]).copy_(m)
            out = self._reduce(plan, sched, backs, srcs, biases, alloc, x.dtype, weights is not None, None)
            self._end_call(True)
            return out
        events = []
        if steps:
            start = self._begin_phase(sched["full"])
            writes, mine = self._views(sched, start, make)[0]
            with self._side():                                   # stores into the sources' staging
                for pushes, wvs in zip(steps[0][0], writes):
                    for (s, a, n, first), wv in zip(pushes, wvs):
                        for sw, v in zip(src, wv):
                            v.copy_(sw[first:first + n])
                    self._barrier()                              # this chunk has landed everywhere
                    events.append(self._mark())
            backs = [m.view(t.dtype).view(n_back, t.size(1)) for m, t in zip(mine, srcs)]
        else:
            backs = [t[:0] for t in srcs]
        out = self._reduce(plan, sched, backs, srcs, biases, alloc, x.dtype, weights is not None, events)
        self._join()
        self._end_call(bool(steps))
        return out

    def _reduce(self, plan: Plan, sched: Dict[str, Any], backs: List[torch.Tensor], srcs: List[torch.Tensor],
                biases: Sequence[torch.Tensor], alloc: Alloc, dtype: torch.dtype, has_w: bool,
                events: Optional[list]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Reduce every token, chunk by chunk as its rows arrive (``events[c]``) when given."""
        me, pos, T = self.rank, sched["pos"], plan.num_tokens
        if not events or len(events) == 1:
            if events:
                self._wait(events[0])
            out = reduce_rows(backs[0], pos, biases, dtype, alloc, local=srcs[0], local_col=me)
            out_w = reduce_rows(backs[1], pos, (), torch.float32, alloc, local=srcs[1], local_col=me) \
                if has_w else None
            return out, out_w
        out = alloc((T, backs[0].size(1)), dtype)
        out_w = alloc((T, backs[1].size(1)), torch.float32) if has_w else None
        t0 = 0
        for ev, t1 in zip(events, sched["ready"]):
            self._wait(ev)
            if t1 <= t0:
                continue
            for res, back, src, bs, dt in ((out, backs[0], srcs[0], [b[t0:t1] for b in biases], dtype),
                                           (out_w, backs[1] if has_w else None, srcs[1] if has_w else None, [],
                                            torch.float32)):
                if res is None:
                    continue
                part = res[t0:t1]
                got = reduce_rows(back, pos[t0:t1], bs, dt, lambda shape, d, part=part: part, local=src,
                                  local_col=me)
                if got.data_ptr() != part.data_ptr():
                    part.copy_(got)
            t0 = t1
        return out, out_w

    def destroy(self) -> None:
        self.peers = []
        self.hdl = None
        self.buf = None
