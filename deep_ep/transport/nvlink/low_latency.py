"""The nvlink transport's low-latency path: one send kernel, one barrier, one receive kernel per call.

:mod:`deep_ep.low_latency` takes this path on the ``nvlink`` transport where
Triton runs (and the hidden size is a multiple of 8); elsewhere it moves the
same rows as a pair dispatch of the transport (the torch path, same
outputs). Nothing here synchronises with the host, so every call can be
captured in a CUDA graph.

**Arena.** The first call allocates symmetric memory of its own (the larger
of ``num_rdma_bytes`` and twice the call's area, agreed between ranks) and
rendezvouses once; a later call that needs more re-allocates (outside
graph capture; once a graph has been captured the old arena is kept alive,
since the graph holds its addresses). The arena holds two areas;
consecutive calls alternate between them, as DeepEP's two buffers do, so a
call's stores never meet the reads of the call before it: a rank stores
call ``n`` after the barrier of call ``n - 1``, which every rank passes after
its reads of call ``n - 2``. A call first passes a barrier of its own where
that order is not known: while the receive hook of an earlier call is
pending (its barrier has not run), under graph capture, and in every eager
call after a capture (a replay does not follow the host's alternation). A
third call while two hooks are pending raises (its area is still unread).

An area (byte offsets, 256-aligned; ``L`` local experts, ``R`` ranks, ``M =
num_max_dispatch_tokens_per_rank``, ``K`` top-k):

- ``cnt``: int32 ``[R, L]``: tokens from source ``s`` for local expert ``l``;
- ``info``: int32 ``[L, R, M]``: the pair ``t * K + k`` of each received row;
- ``data``: ``[R, M]`` rows of ``rowb`` bytes, one per (source, token) that
  names at least one of this rank's experts (stored once, whatever the number
  of those experts): fp8 values then the scales (float32 per 128, or UE8M0
  bytes), padded to 16 bytes; or bf16;
- a combine's area (over the same bytes): ``wts``, float32 ``[R, M, K]``, each
  source's combine weights; ``part``, bf16 ``[M, R, H]``: for each of this
  rank's tokens, the weighted sum of its expert outputs on rank ``r``.

**Combine** sums on the experts' side first: every rank stores its combine
weights into every rank's ``wts`` and passes a barrier; then, per (source,
token), the rank that holds some of the token's experts sums their outputs
times the source's weights (float32) and stores one bf16 row into the
source's ``part``; after the barrier the source adds the rows of the ranks its
token went to (float32, then its dtype). DeepEP returns every expert's row
(one per (token, expert)): with top-8 of 288 experts on 2 ranks ~4x more
bytes cross the link. The partial sums are rounded to bf16 once before they
travel (DeepEP's rows are bf16 expert outputs too).

Every rank of the group must pass the same ``num_max_dispatch_tokens_per_rank``,
``hidden``, ``num_experts``, top-k and fp8 settings (DeepEP's contract);
the token count may differ. With receive hooks, at most two calls may be
pending (their hooks not yet called), as in DeepEP; every rank calls its
hooks in the order of their calls and at the same points between calls.

**Invalid routing** (an expert id out of ``[-1, num_experts)`` or named
twice by a token) cannot be reported without a host sync: the kernel skips
the entry and sets a flag, and this rank's next low-latency call raises
:class:`~deep_ep.errors.DeepEPInputError` (the other ranks then wait out
``timeout_s``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ...errors import DeepEPError, DeepEPInputError
from .schedule import _capturing

_ALIGN = 256


def _up(n: int, a: int) -> int:
    return -(-n // a) * a


@functools.lru_cache(maxsize=64)
def area_layout(R: int, E: int, M: int, K: int, H: int, fp8: bool, ue8m0: bool) -> Dict[str, Any]:
    """Byte offsets and sizes of one area (see the module docstring); cached, treat as read-only."""
    L = E // R
    info = _up(R * L * 4, _ALIGN)
    data = _up(info + L * R * M * 4, _ALIGN)
    if fp8:
        nb = H // 128
        rowb = H + _up(nb if ue8m0 else 4 * nb, 16)
    else:
        rowb = 2 * H
    wts = 0  # a combine's area: the weights, then the partial rows
    part = _up(R * M * K * 4, _ALIGN)
    end = max(data + R * M * rowb, part + M * R * 2 * H)
    return dict(
        L=L,
        E=E,
        M=M,
        K=K,
        H=H,
        fp8=fp8,
        ue8m0=ue8m0,
        cnt=0,
        info=info,
        data=data,
        rowb=rowb,
        wts=wts,
        part=part,
        bytes=_up(end, 4096),
    )


class LowLatencyArena:
    """This rank's symmetric memory for low-latency calls, its peers' distances, and the invalid-routing
    flag (device word, with a pinned host copy)."""

    def __init__(self, transport, nbytes: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.rank, self.num_ranks, dev = transport.rank, transport.num_ranks, transport.device
        self.nbytes = nbytes
        self.buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=dev)
        try:
            self.hdl = symm_mem.rendezvous(self.buf, transport.group)
        except TypeError:  # pragma: no cover - older torch takes the group name
            self.hdl = symm_mem.rendezvous(self.buf, transport.group.group_name)
        bases = [self.hdl.get_buffer(p, (nbytes,), torch.uint8, 0).data_ptr() for p in range(self.num_ranks)]
        d = [b - bases[self.rank] for b in bases]
        self.aligned = all(x % 64 == 0 for x in d)
        self.dbytes = torch.tensor(d, dtype=torch.int64).to(dev)
        self.dwords = torch.tensor([x // 4 for x in d], dtype=torch.int64).to(dev)
        self.u8 = self.buf
        self.i32 = self.buf.view(torch.int32)
        self.bf16 = self.buf.view(torch.bfloat16)
        self.err = torch.zeros(1, dtype=torch.int32, device=dev)
        self.err_host = torch.zeros(1, dtype=torch.int32).pin_memory()
        self.seq = 0
        self.timeout_ms = int(transport.timeout_s * 1000) + 10_000

    def barrier(self) -> None:
        """A device barrier of every rank of the group (on the current stream)."""
        self.hdl.barrier(channel=0, timeout_ms=self.timeout_ms)

    def peek_area(self) -> int:
        """Byte offset of the area the next call takes (the two alternate)."""
        return (self.seq % 2) * (self.nbytes // 2)

    def next_area(self) -> int:
        """Take the next call's area: its byte offset."""
        off = self.peek_area()
        self.seq += 1
        return off


class NVLinkLowLatency:
    """The low-latency calls of one Buffer on the nvlink transport (made by its first low-latency call)."""

    def __init__(self, transport, min_bytes: int) -> None:
        self.transport = transport
        self.min_bytes = int(min_bytes)
        self.arena: Optional[LowLatencyArena] = None
        self.nprog = torch.cuda.get_device_properties(transport.device).multi_processor_count
        self.usable = True
        self.pending = 0  # calls whose receive hook has not run
        self.pending_areas: set = set()  # areas of calls whose receive hook has not run
        self.captured = False  # a call has been captured into a CUDA graph
        self.retired = []  # arenas a captured graph may still use

    # ------------------------------------------------------------------ set-up
    def _ensure(self, area_bytes: int) -> LowLatencyArena:
        a = self.arena
        if a is not None and a.nbytes // 2 >= area_bytes:
            return a
        if _capturing():
            raise DeepEPError(
                "deep_ep low-latency: the first call with these sizes allocates the staging; make "
                "it once outside CUDA-graph capture (a warm-up), then capture"
            )
        need = _up(max(2 * area_bytes, self.min_bytes), 1 << 21)
        needs = self.transport.all_gather_ints(torch.tensor([need]), "low-latency staging")[:, 0].tolist()
        if len(set(needs)) > 1:
            raise DeepEPInputError(
                f"low-latency calls differ between ranks (staging bytes {needs}): every rank "
                f"must pass the same num_max_dispatch_tokens_per_rank, hidden, num_experts, "
                f"top-k and fp8 settings"
            )
        if self.captured and self.arena is not None:
            self.retired.append(self.arena)
        self.arena = None
        torch.cuda.synchronize(self.transport.device)
        a = LowLatencyArena(self.transport, need)
        oks = self.transport.all_gather_ints(torch.tensor([int(a.aligned)]), "low-latency staging")[:, 0].tolist()
        if not all(oks):  # pragma: no cover - symmetric allocations are page-aligned
            self.usable = False
            raise DeepEPError("deep_ep low-latency: the peers' staging is not 64-byte aligned")
        self.arena = a
        return a

    def _raise_flagged(self) -> None:
        a = self.arena
        if a is None or not int(a.err_host[0]):
            return
        bits = int(a.err_host[0])
        a.err.zero_()
        a.err_host.zero_()
        what = [
            w
            for b, w in ((1, "a token named the same expert twice"), (2, "an expert id was outside [-1, num_experts)"))
            if bits & b
        ]
        raise DeepEPInputError(
            f"an earlier low_latency_dispatch on this rank had invalid topk_idx ({'; '.join(what)}); "
            f"those entries were skipped"
        )

    # ------------------------------------------------------------------ calls
    def _start(self, a: LowLatencyArena) -> int:
        """Take the call's area and pass the leading barrier where the order is not known (see the
        module docstring); returns the area's byte offset."""
        if self.pending >= 2:
            raise DeepEPInputError(
                "two low-latency calls already wait for their receive hooks; call them "
                "(in order) before a third call (as DeepEP: two buffers)"
            )
        if a.peek_area() in self.pending_areas:
            raise DeepEPInputError(
                "this low-latency call would take the staging area of an earlier call whose receive hook has "
                "not run (calls alternate between two areas): call that hook first"
            )
        capturing = _capturing()
        self.captured = self.captured or capturing
        off = a.next_area()
        if capturing or self.captured or self.pending:
            a.barrier()
        return off

    def _hook(self, fn: Callable[[], None], area: int) -> Callable[[], None]:
        """A receive hook: ``fn`` on its first call (nothing after); its call and its ``area`` count as
        pending until then."""
        self.pending += 1
        self.pending_areas.add(area)
        done = [False]

        def hook() -> None:
            if not done[0]:
                done[0] = True
                self.pending -= 1
                self.pending_areas.discard(area)
                fn()

        return hook

    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        M: int,
        E: int,
        use_fp8: bool,
        round_scale: bool,
        use_ue8m0: bool,
        stats: Optional[torch.Tensor],
        hook: bool,
    ) -> Tuple[Any, torch.Tensor, Dict[str, Any], Optional[Callable[[], None]]]:
        """Send now; receive now or in the returned hook. Returns ``(recv_x, recv_count, state, hook)``."""
        from ...kernels import low_latency as k

        self._raise_flagged()
        R = self.transport.num_ranks
        T, H = x.shape
        K = topk_idx.size(1)
        lay = area_layout(R, E, M, K, H, use_fp8, use_ue8m0)
        a = self._ensure(lay["bytes"])
        off = self._start(a)
        L, dev = lay["L"], x.device
        k.send(x.contiguous(), topk_idx.contiguous(), a, off, lay, a.err, round_scale, use_ue8m0)
        if not _capturing():
            a.err_host.copy_(a.err, non_blocking=True)
        rows = L * R * M
        if use_fp8:
            vals = torch.empty((L, R * M, H), dtype=torch.float8_e4m3fn, device=dev)
            nb = H // 128
            scales = (
                torch.empty((L, R * M, nb // 4), dtype=torch.int32, device=dev)
                if use_ue8m0
                else torch.empty((L, R * M, nb), dtype=torch.float32, device=dev)
            )
            recv_x: Any = (vals, scales)
            main, tail = vals.view(torch.int32).view(rows, H // 4), scales.view(torch.int32).view(rows, -1)
        else:
            vals = torch.empty((L, R * M, H), dtype=torch.bfloat16, device=dev)
            recv_x = vals
            main, tail = vals.view(torch.int32).view(rows, H // 2), None
        count = torch.empty(L, dtype=torch.int32, device=dev)
        src = torch.empty(rows, dtype=torch.int32, device=dev)
        inv = torch.full((R * M * K,), -1, dtype=torch.int32, device=dev)

        state = dict(lay=lay, count=count, src=src, inv=inv, received=False)

        def receive() -> None:
            a.barrier()
            k.recv(a, off, lay, main, tail, count, src, inv, self.nprog)
            if stats is not None:
                stats.add_(count.to(stats.dtype))
            state["received"] = True

        if hook:
            return recv_x, count, state, self._hook(receive, off)
        receive()
        return recv_x, count, state, None

    def combine(
        self,
        y: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        state: Dict[str, Any],
        out: torch.Tensor,
        hook: bool,
    ) -> Optional[Callable[[], None]]:
        """Send ``y``'s rows home now; reduce into ``out`` now or in the returned hook."""
        from ...kernels import low_latency as k

        self._raise_flagged()
        a = self.arena
        lay = state["lay"]
        off = self._start(a)
        idx = topk_idx.to(torch.int64).contiguous()
        w = topk_weights.to(torch.float32).contiguous()
        k.put_weights(w, a, off, lay)
        a.barrier()  # every rank's weights are in every table
        k.combine_send(y.contiguous(), state["inv"], a, off, lay, self.nprog)

        def receive() -> None:
            a.barrier()
            if idx.size(0):
                k.combine_reduce(a, off, lay, idx, out)

        if hook:
            return self._hook(receive, off)
        receive()
        return None

    def destroy(self) -> None:
        """Drop the arenas (the symmetric memory is freed with them)."""
        self.arena = None
        self.retired = []
