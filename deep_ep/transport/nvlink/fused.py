"""The nvlink transport's fused path (``DEEP_EP_NVLINK_PATH=fused``): few launches, one host wait.

A fresh dispatch is one *notify* kernel, one read of the received count from pinned host memory the
kernel writes (the only thing the host waits for), the outputs' allocation, and one *data* kernel; a
cached dispatch is the data kernel; a combine one kernel. The ranks meet inside the kernels through
flags in their symmetric memory (:mod:`deep_ep.kernels.fused` explains the epoch protocol), so there is no
metadata all-gather, no device barrier between launches and no blocking copy. ``get_dispatch_layout``
adds its one kernel: a fresh dispatch is three launches in all.

The notify kernel also publishes every rank's call header, so the ranks check each other's arguments
as the host path's metadata exchange does: the host reads every rank's header from the pinned block and
raises the same error on every rank (:func:`deep_ep.agreement.check_rows`). A ``num_worst_tokens``
dispatch does not wait: its verdict is read at a later call (:meth:`FusedPath.check_deferred`).

Memory of the staging buffer: the control region at its end (``ctl`` words, the flags, two metadata
areas of ``R`` rows), and the host path's two data halves as the two data areas. A call whose rows do
not fit an area (the notify's verdict, the same on every rank) moves its rows by the host path instead,
between barriers.

Without the kernels (CPU without the interpreter, ``DEEP_EP_DISABLE_TRITON``) the transport takes the
host path.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ...agreement import _H_E, _H_ERR, _H_WORST, _HEADER
from ...caches import keep
from ...errors import DeepEPInputError, DeepEPTimeoutError, RankMismatchError
from ...kernels.protocol import CTL_GIVE_UP
from ...rows import Alloc

__all__ = ["FusedPath", "FusedLayout", "MS", "fused_control_bytes"]

#: int64 words of a rank's metadata row (header, counts, id range, expert counts: a call with more experts
#: than fit takes the host path, :meth:`FusedPath.fused_takes_dispatch`)
MS = 1280
#: dtypes the fused combine reduces (float32 sums)
_FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ALIGN = 256
_CTL_BYTES = 4096
_FLAG_BYTES = 4096
#: pinned host ring: slots of (inputs: header + ticket) and (outputs: the notify's block)
_IN_W = 32
_OUT_W = 8 + 64 * 16 + 64 * 64 + 2 * 64 + 4096
_SLOTS = 8


def fused_control_bytes(num_ranks: int) -> int:
    """Bytes of the fused path's control region at the end of the staging buffer."""
    return _CTL_BYTES + _FLAG_BYTES + 2 * num_ranks * MS * 8


@dataclass
class FusedLayout:
    """The device side of a fused plan (kept in the handle).

    Attributes:
        chan: int64 scratch whose first ``NCH * (2R + 4)`` words are a row per channel of this rank's
            tokens: the rows to each rank, where they start there, the channel's least and greatest id.
        dev: int64: received rows, own rows' first and end row, the prefix matrix, the per-expert counts,
            the verdict (the notify's device outputs).
        slot: int32 ``[T, R]``: the row of each (token, rank) among that rank's received rows (-1: not sent).
        nch: channels.
        rpm: int32 ``[R, R]`` ``rank_prefix_matrix`` (written by the notify).
        L: local experts per rank (0 without top-k).
        back: the most rows a rank gets back in a combine of this plan (-1: not computed yet, or not known
            on the host); counts: the plan's counts matrix ``[R, R]`` on the host (``None`` for a deferred plan).
    """

    chan: torch.Tensor
    dev: torch.Tensor
    slot: Optional[torch.Tensor]
    nch: int
    rpm: torch.Tensor
    L: int = 0
    back: int = -1
    counts: Optional[np.ndarray] = None


def _words(t: torch.Tensor) -> torch.Tensor:
    """Rows of ``t`` as the widest integer words their byte width allows."""
    width = t.size(1) * t.element_size() if t.dim() == 2 else 0
    for dt, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if width % size == 0 and t.is_contiguous():
            try:
                return t.view(dt)
            except RuntimeError:
                break
    return t.contiguous().view(torch.uint8).view(t.size(0), -1)


class FusedPath:
    """Mixin of :class:`~deep_ep.transport.nvlink.transport.NVLinkTransport`: the fused path (see the module
    docstring and docs/design.md): the notify, data and combine kernels' host side, the pinned ring the
    host reads the notify's block from, and the eligibility checks the Buffer asks."""

    fused_reserve_bytes = 0

    def _fused_setup(self) -> None:
        R = self.num_ranks
        self.fused_ctl_b = self.nbytes - fused_control_bytes(R)  # byte offset of the control region
        self._flag_w = (self.fused_ctl_b + _CTL_BYTES) // 8
        self._meta_w = (self.fused_ctl_b + _CTL_BYTES + _FLAG_BYTES) // 8
        own = self.peers[self.rank]
        self._own_words = own.view(torch.int64)
        self._ctl = self._own_words[self.fused_ctl_b // 8 : self.fused_ctl_b // 8 + _CTL_BYTES // 8]
        self._ctl.zero_()
        self._ctl_np = self._ctl.numpy() if self._ctl.device.type == "cpu" else None  # the interpreter's watchdog
        self._own_words[self._flag_w : self._flag_w + R].zero_()
        base = own.data_ptr()
        self._delta_w = torch.tensor([(p.data_ptr() - base) // 8 for p in self.peers], dtype=torch.int64).to(
            self.device
        )
        pin = self.device.type == "cuda"
        ring = torch.zeros(((_SLOTS + 1) * (_IN_W + _OUT_W),), dtype=torch.int64)
        self._ring = ring.pin_memory() if pin else ring
        self._ring_np = self._ring.numpy()
        w = _IN_W + _OUT_W
        self._ring_in = [self._ring[k * w : k * w + _IN_W] for k in range(_SLOTS + 1)]
        self._ring_out = [self._ring[k * w + _IN_W : (k + 1) * w] for k in range(_SLOTS + 1)]
        self._in_np = [self._ring_np[k * w : k * w + _IN_W] for k in range(_SLOTS + 1)]
        self._dirty = False  # the host path used the data areas: a barrier before the next fused kernel
        self._interp = _interp()  # the kernels run under Triton's interpreter (fixed for the process)
        self._phases: Optional[List[Tuple]] = None  # see _launch
        self._notify_static: dict = {}  # per call shape: capacity, channels, constexprs (fused_notify)
        self._data_static: dict = {}  # the same for fused_dispatch
        self._combine_static: dict = {}  # and fused_combine
        self._ctl_w = self.fused_ctl_b // 8
        self._slot = 0
        self._ticket = 0
        self._pending: List[Tuple[int, int, int]] = []  # (slot, ticket, seq) of num_worst_tokens notifies
        self._limit_ns = int(self.timeout_s * 1e9)
        #: the host's spin outlasts the kernel's own bounded wait by this much (a kernel that never runs)
        self._spin_grace_s = 5.0
        self._nsm = torch.cuda.get_device_properties(self.device).multi_processor_count if pin else 8
        self.sym.barrier()  # every rank's control region is zero before any flag arrives
        from ...kernels import available_on

        self.fused_ready = self.settings.nvlink_path == "fused" and available_on(self.device)
        if self.fused_ready:
            from ...kernels import fused as kf
            from ...kernels.launch import Launcher

            self._k_notify = Launcher(kf._notify_kernel, num_warps=4)
            self._k_dispatch = Launcher(kf._dispatch_kernel, num_warps=8)
            self._k_combine = Launcher(kf._combine_kernel, num_warps=8)

    # ---------------------------------------------------------------- host ring
    def _in(self, slot: int) -> np.ndarray:
        return self._in_np[slot]

    def _out(self, slot: int) -> np.ndarray:
        b = slot * (_IN_W + _OUT_W) + _IN_W
        return self._ring_np[b : b + _OUT_W]

    def _limit(self) -> int:
        return self._limit_ns

    def _launch(self, bound: Any, grid: Tuple[int, ...], split: Tuple, args: Tuple) -> None:
        """Launch one of the fused kernels (``bound``: its :class:`~deep_ep.kernels.launch.Bound`, kept with the
        call shape's statics; ``args``: its positional arguments). Under the interpreter (no clock in the kernel) a watchdog thread
        sets the control word ``CTL_GIVE_UP`` once a launch outlives ``timeout_s``, ending the kernel's
        waits as the clock does on a GPU.

        ``split``: the grids of the kernel's ``ROLE`` 1 and 2 launches. When :attr:`_phases` is a list
        (ranks emulated in one process, ``tests/test_fused_kernels.py``) the launch is recorded there
        instead, for the test to run every rank's first half, then every rank's second half."""
        if self._phases is not None:
            self._phases.append((bound.launcher, split, args, bound.constexprs))
            return
        if not self._interp or bound.launcher.replay is not None:  # (a replay runs no kernel: no watchdog)
            bound.launcher.launch(grid, args, bound)
            return
        dog = self._watchdog()
        with dog.lock:
            dog.deadline = time.monotonic() + self.timeout_s
        try:
            bound.launcher.launch(grid, args, bound)
        finally:
            with dog.lock:
                dog.deadline = None
                self._ctl_np[CTL_GIVE_UP] = 0

    def _watchdog(self) -> "_Watchdog":
        dog = getattr(self, "_dog", None)
        if dog is None:
            dog = self._dog = _Watchdog(self._ctl_np)
        return dog

    # ---------------------------------------------------------------- notify
    def fused_notify(
        self,
        header: List[int],
        mask: torch.Tensor,
        topk_idx: Optional[torch.Tensor],
        per_expert: Optional[torch.Tensor],
        num_experts: int,
        widths: Sequence[int],
        wait: bool,
        capturing: bool,
        seq: int,
    ) -> Tuple[FusedLayout, Optional[np.ndarray], int]:
        """Launch the notify kernel; with ``wait`` spin until its block is written and return it.

        Args:
            header: this call's header ints (its local verdict included).
            mask: bool ``[T, R]`` (``is_token_in_rank``); topk_idx: int64 ``[T, K]`` or ``None``;
            per_expert: int ``[E]`` or ``None``; num_experts: ``E`` (0 without top-k).
            widths: byte widths of the rows the data kernel will move (the area's capacity in rows).
            wait: read the block (host-known plan); else queue it for :meth:`check_deferred`.
            capturing: under CUDA-graph capture (a reserved slot whose header stays zero).
            seq: the call's number (in deferred errors).

        Returns:
            ``(layout, block or None, capacity rows)``.
        """
        T = mask.size(0)
        E = max(num_experts, 0)
        K = topk_idx.size(1) if topk_idx is not None else 1
        st = self.fused_notify_statics(T, E, K, topk_idx is not None, widths)
        return self.fused_notify_run(st, header, mask, topk_idx, per_expert, wait, capturing, seq)

    def fused_notify_statics(self, T: int, E: int, K: int, has_idx: bool, widths: Sequence[int]) -> Tuple:
        """What a notify of one call shape needs beyond its tensors (made once per shape, kept by the caller
        that repeats the shape: :meth:`fused_notify_run`).

        Args:
            T: tokens; E: experts (0 without top-k); K: top-k (1 without); has_idx: top-k ids are given;
            widths: byte widths of the rows the data kernel will move.

        Returns:
            An opaque tuple.
        """
        R, me = self.num_ranks, self.rank
        L = E // R if E > 0 else 0
        key = (T, E, K, has_idx, tuple(widths))
        st = self._notify_static.get(key)
        if st is None:  # what depends on the call's shapes only, once per shape
            cap = self._area_cap(widths)
            nch = max(1, min(self._nsm // 2, -(-T // 256))) if T else 1
            CW = 2 * R + 4
            ce = dict(
                RANK=me,
                R=R,
                RP=max(2, _p2(R)),
                HDR=_HEADER,
                HP=_p2(_HEADER),
                FIELDS=_field_bits(),
                H_ERR=_H_ERR,
                H_WORST=_H_WORST,
                H_E=_H_E,
                EP=max(2, _p2(E)),
                LP=max(2, _p2(L)),
                HAS_IDX=has_idx,
                KP=max(2, _p2(K)),
                BT=64,
                INTERP=self._interp,
                ROLE=0,
            )
            grids = (nch + 1,), ((nch + 1,), (1,))
            st = (cap, nch, CW, nch * CW + 3 + R * R + L + 8) + grids + (self._k_notify.bind(ce), T, E, K, L)
            keep(self._notify_static, key, st)
        return st

    def fused_notify_run(
        self,
        st: Tuple,
        header: List[int],
        mask: torch.Tensor,
        topk_idx: Optional[torch.Tensor],
        per_expert: Optional[torch.Tensor],
        wait: bool,
        capturing: bool,
        seq: int,
    ) -> Tuple[FusedLayout, Optional[np.ndarray], int]:
        """:meth:`fused_notify` with its statics (:meth:`fused_notify_statics` of the call's shape) given."""
        R = self.num_ranks
        cap, nch, CW, n_scratch, grid, split, bound, T, E, K, L = st
        dev = mask.device
        if capturing:
            slot = _SLOTS
            self._in(slot)[:] = 0
        else:
            slot = self._slot
            self._slot = (slot + 1) % _SLOTS
            inp = self._in(slot)
            inp[:_HEADER] = header
            self._ticket += 1
            inp[_HEADER] = self._ticket
        self._slot_of_last = slot  # (tests read the block of a notify they launched themselves)
        # the channels' rows at the front of one scratch (the kernels index them from its start), the device
        # plan after them; rank_prefix_matrix its own tensor (the handle's element 0)
        chan = torch.empty(n_scratch, dtype=torch.int64, device=dev)  # (sizes as arguments: parsed faster)
        devv = chan[nch * CW :]
        rpm = torch.empty(R, R, dtype=torch.int32, device=dev)
        if self._dirty:
            self._clean()
        self._launch(
            bound,
            grid,
            split,
            (
                mask,
                topk_idx if topk_idx is not None else chan,
                per_expert if per_expert is not None else chan,
                self._ring_in[slot],
                self._ring_out[slot],
                self._own_words,
                self._delta_w,
                chan,
                devv,
                rpm,
                T,
                K,
                E,
                L,
                nch,
                cap,
                self._ctl_w,
                self._flag_w,
                self._meta_w,
                MS,
                self._limit_ns,
            ),
        )
        layout = FusedLayout(chan=chan, dev=devv, slot=None, nch=nch, rpm=rpm, L=L)
        if not wait:
            if not capturing:
                self._pending.append((slot, self._ticket, seq))
            return layout, None, cap
        return layout, self._spin(slot, self._ticket, seq), cap

    def _spin(self, slot: int, ticket: int, seq: int) -> np.ndarray:
        """Wait until the notify of ``ticket`` wrote its block (bounded: the kernel gives up first and says
        which ranks did not come); return the block."""
        out = self._out(slot)
        if out[0] == ticket and not out[1]:  # (already written: no clock read)
            return out
        t0 = time.monotonic()
        deadline = t0 + self.timeout_s + self._spin_grace_s
        spins = 0
        while out[0] != ticket:
            spins += 1
            if spins > 2000:
                if time.monotonic() > deadline:
                    self.waiter.seq = seq
                    self.waiter.fail("fused notify", time.monotonic() - t0)
                time.sleep(0 if spins < 20000 else 5e-5)
        if out[1]:
            missing = [r for r in range(self.num_ranks) if (int(out[2]) >> r) & 1]
            self.waiter.broken = f"timed out in call #{seq} (fused notify)"
            raise DeepEPTimeoutError(
                f"deep_ep: rank {self.rank} waited {self.timeout_s:g}s in call #{seq} (dispatch metadata); rank(s) "
                f"{missing} did not arrive. The Buffer is unusable now."
            )
        return out

    def check_deferred(self) -> None:
        """Raise for the first completed ``num_worst_tokens`` notify whose verdict found a problem."""
        while self._pending:
            slot, ticket, seq = self._pending[0]
            out = self._out(slot)
            if out[0] != ticket:
                return
            self._pending.pop(0)
            v = [int(x) for x in out[4:8]]
            if out[1]:
                self.waiter.broken = f"timed out in call #{seq} (fused notify)"
                raise DeepEPTimeoutError(f"deep_ep: num_worst_tokens dispatch call #{seq} timed out waiting for ranks")
            if v[0]:
                raise RankMismatchError(
                    f"deep_ep: in num_worst_tokens dispatch call #{seq}, the ranks disagreed on the operation, the "
                    f"call number or the shapes / dtypes (or a rank rejected its input); its results are garbage."
                )
            if v[1]:
                raise DeepEPInputError(
                    f"deep_ep: in num_worst_tokens dispatch call #{seq}, a rank received more tokens than its "
                    f"num_worst_tokens; the rows beyond it were dropped."
                )
            if v[2]:
                raise DeepEPInputError(
                    f"deep_ep: in num_worst_tokens dispatch call #{seq}, a rank's topk_idx held an expert id "
                    f"outside [-1, num_experts); those entries were dropped."
                )
            if v[3]:
                raise DeepEPInputError(
                    f"deep_ep: in num_worst_tokens dispatch call #{seq}, a rank received more rows than the staging "
                    f"holds; raise num_nvl_bytes."
                )

    def _area_cap(self, widths: Sequence[int]) -> int:
        """Rows of ``widths`` bytes (one region per tensor) one data area holds."""
        n = max(len(widths), 1)
        return max(0, (self.half_bytes - _ALIGN * n) // max(sum(widths), 1))

    def _regions(self, widths: Sequence[int], cap: int) -> List[int]:
        """Byte offsets of each tensor's region in an area (``cap`` rows each)."""
        out, off = [], 0
        for w in widths:
            out.append(off)
            off = -(-(off + cap * w) // _ALIGN) * _ALIGN
        return out

    # ---------------------------------------------------------------- data
    def _clean(self) -> None:
        """After the host path used the data areas: a barrier, so no rank's fused kernel writes an area a
        peer's host-path call still reads."""
        if self._dirty:
            self.sym.barrier()
            self._dirty = False

    def fused_dispatch(
        self, plan: Any, rows: Sequence[torch.Tensor], alloc: Alloc, fresh: bool, has_scales: bool, num_sms: int
    ) -> List[torch.Tensor]:
        """The data kernel.

        Args:
            plan: a plan with ``fused`` (from :meth:`fused_notify`).
            rows: ``(x, [scales], [top-k ids int64 [T, K], [weights float32 [T, K]]])``.
            alloc: the outputs' allocator.
            fresh: the dispatch's first data kernel (writes the plan's ``slot``).
            has_scales: ``rows[1]`` is the fp8 scales.
            num_sms: receiving programs at most half of it.

        Returns:
            The received tensors, ``[plan.num_out_rows, ...]`` (padding rows zero, top-k ids -1).
        """
        fl: FusedLayout = plan.fused
        R, me = self.num_ranks, self.rank
        x = rows[0]
        has_s = has_scales
        s = rows[1] if has_s else None
        rest = rows[2:] if has_s else rows[1:]
        idx = rest[0] if rest else None
        w = rest[1] if len(rest) > 1 else None
        N = plan.num_out_rows
        T = x.size(0)
        K = idx.size(1) if idx is not None else 0
        nrecv = max(1, min(num_sms // 2, -(-N // 64))) if N else 1  # (N itself is an argument)
        key = (
            x.dtype,
            x.shape,
            s.shape if s is not None else None,
            K,
            w is not None,
            fresh,
            nrecv,
            fl.nch,
            fl.L,
            num_sms,
        )
        st = self._data_static.get(key)
        if st is None:  # what depends on the call's shapes only, once per shape
            xw = _words(x)
            sw = _words(s) if s is not None else None
            widths = [xw.size(1) * xw.element_size()]
            if sw is not None:
                widths.append(sw.size(1) * sw.element_size())
            if idx is not None:
                widths.append(8 * K)
                if w is not None:
                    widths.append(4 * K)
            cap = self._area_cap(widths)
            offs = self._regions(widths, cap)
            i = 1
            rx = offs[0] // xw.element_size()
            rs = offs[i] // sw.element_size() if sw is not None else 0
            i += 1 if sw is not None else 0
            ri = offs[i] // 8 if idx is not None else 0
            rw = offs[i + 1] // 4 if w is not None else 0
            ce = dict(
                RANK=me,
                R=R,
                RP=max(2, _p2(R)),
                HAS_S=sw is not None,
                HAS_I=idx is not None,
                HAS_W=w is not None,
                WRITE_SLOT=fresh,
                KP=max(2, _p2(K)),
                TOK=16,
                BX=min(1024, max(16, _p2(xw.size(1)))),
                BS=min(256, max(16, _p2(sw.size(1)))) if sw is not None else 16,
                INTERP=self._interp,
                ROLE=0,
            )
            ints = (
                cap,
                xw.size(1),
                sw.size(1) if sw is not None else 0,
                max(K, 1),
                fl.L,
                fl.nch,
                nrecv,
                self._ctl_w,
                self._flag_w,
                self.halves[0] // 8,
                self.half_bytes // 8,
                rx,
                rs,
                ri,
                rw,
                self._limit_ns,
            )
            # the rows as integer words: a view of the dtype _words picked (None: its byte fallback, per call)
            xdt = xw.dtype if xw.dtype != torch.uint8 else None
            sdt = (sw.dtype if sw.dtype != torch.uint8 else None) if sw is not None else None
            st = ((fl.nch + nrecv,), ((fl.nch,), (nrecv,)), ints, self._k_dispatch.bind(ce), xdt, sdt)
            keep(self._data_static, key, st)
        grid, split, ints, bound, xdt, sdt = st
        xw = x.view(xdt) if xdt is not None else _words(x)
        ox = alloc((N, x.size(1)) if x.dim() == 2 else (N,) + x.shape[1:], x.dtype)
        oxw = ox.view(xdt) if xdt is not None else _words(ox)
        outs = [ox]
        sw = osw = None
        if s is not None:
            sw = s.view(sdt) if sdt is not None else _words(s)
            os_ = alloc((N,) + s.shape[1:], s.dtype)
            osw = os_.view(sdt) if sdt is not None else _words(os_)
            outs.append(os_)
        oi = ow = None
        if idx is not None:
            oi = alloc((N, K), torch.int64)
            outs.append(oi)
            if w is not None:
                ow = alloc((N, K), torch.float32)
                outs.append(ow)
        if fresh:
            fl.slot = torch.empty(T, R, dtype=torch.int32, device=x.device)
        if self._dirty:
            self._clean()
        self._launch(
            bound,
            grid,
            split,
            (
                plan.is_token_in_rank,
                fl.chan,
                fl.dev,
                self._own_words,
                self._delta_w,
                fl.slot,
                xw,
                oxw,
                sw if sw is not None else xw,
                osw if osw is not None else oxw,
                idx if idx is not None else fl.dev,
                oi if oi is not None else fl.dev,
                w if w is not None else fl.dev,
                ow if ow is not None else fl.dev,
                T,
                N,
                *ints,
            ),
        )
        self._fence = True  # the host path's next phase passes a barrier first (a peer may still read)
        return outs

    def fused_combine(
        self,
        plan: Any,
        x: torch.Tensor,
        weights: Optional[torch.Tensor],
        biases: Sequence[torch.Tensor],
        alloc: Alloc,
        num_sms: int,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The combine kernel: rows and their weights back to their sources, reduced in rank order.

        Args:
            plan: a plan with ``fused`` (its ``slot`` written by the fresh dispatch's data kernel).
            x: ``[N, H]`` rows laid out as the received ones (bf16 / f16 / f32).
            weights: float32 ``[N, K]`` summed like the rows, or ``None``.
            biases: 0, 1 or 2 tensors ``[T, H]`` added to the sums.
            alloc: the outputs' allocator.
            num_sms: sending programs at most half of it.

        Returns:
            ``(out [T, H] x.dtype, weights float32 [T, K] or None)``.
        """
        fl: FusedLayout = plan.fused
        R, me = self.num_ranks, self.rank
        T, H = plan.num_tokens, x.size(1)
        K = weights.size(1) if weights is not None else 0
        nsend = max(1, min(num_sms // 2, -(-max(plan.num_out_rows, 1) // 64)))
        nred = max(1, min(num_sms, -(-max(T, 1) // 16)))
        key = (x.dtype, H, K, weights is not None, len(biases), nsend, nred)  # (the row counts are arguments)
        st = self._combine_static.get(key)
        if st is None:  # what depends on the call's shapes only, once per shape
            widths = [H * x.element_size()] + ([4 * K] if weights is not None else [])
            cap = self._area_cap(widths)
            offs = self._regions(widths, cap)
            ints = (
                cap,
                nsend,
                nred,
                self.fused_ctl_b // 8,
                self._flag_w,
                self.halves[0] // 8,
                self.half_bytes // 8,
                offs[0] // x.element_size(),
                offs[1] // 4 if weights is not None else 0,
                self._limit(),
            )
            ce = dict(
                RANK=me,
                R=R,
                RP=max(2, _p2(R)),
                HAS_W=weights is not None,
                NB=len(biases),
                KP=max(2, _p2(K)),
                TOK=16,
                BLOCK=min(512, max(16, _p2(H))),
                INTERP=self._interp,
                ROLE=0,
            )
            st = keep(self._combine_static, key, ((nsend + nred,), ((nsend,), (nred,)), ints, self._k_combine.bind(ce)))
        grid, split, ints, bound = st
        out = alloc((T, H), x.dtype)
        out_w = alloc((T, K), torch.float32) if weights is not None else None
        self._clean()
        b0 = biases[0] if len(biases) > 0 else out
        b1 = biases[1] if len(biases) > 1 else out
        self._launch(
            bound,
            grid,
            split,
            (
                x,
                weights if weights is not None else x,
                fl.slot,
                fl.rpm,
                fl.dev,
                self._own_words,
                self._delta_w,
                b0,
                b1,
                out,
                out_w if out_w is not None else out,
                T,
                H,
                max(K, 1),
                x.size(0),
            )
            + ints,
        )
        self._fence = True  # the host path's next phase passes a barrier first (a peer may still read)
        return out, out_w

    def fused_takes_dispatch(self, num_experts: int) -> bool:
        """Whether a fresh dispatch of ``num_experts`` experts takes the fused path: its kernels are ready and
        a rank's metadata row (header, counts, id range, expert counts) fits its ``MS`` words."""
        return self.fused_ready and _HEADER + self.num_ranks + 2 + max(num_experts, 0) <= MS

    def fused_takes_combine(self, plan: Any, x: torch.Tensor, num_topk: int) -> bool:
        """Whether a combine by the fused ``plan`` takes the fused path: float32 sums of ``x``'s dtype
        (float64 rows take the host path's float64 sums), and the rows every rank gets back fit one area
        (host-known plans: the same answer on every rank)."""
        if x.dtype not in _FUSED_DTYPES:
            return False
        fl = plan.fused
        back = fl.back
        if back == -1 and fl.counts is not None:  # once per handle: the most rows a rank gets back
            C = fl.counts
            back = fl.back = int((C.sum(axis=1) - C.diagonal()).max())
        if back < 0:
            return True
        widths = [x.size(1) * x.element_size()] + ([4 * num_topk] if num_topk else [])
        return back <= self._area_cap(widths)


@functools.lru_cache(maxsize=1)
def _field_bits() -> int:
    """The header words the ranks must agree on, as a bit mask (the notify kernel's ``FIELDS``)."""
    from ...plans import _FIELDS

    return sum(1 << f for f in set(_FIELDS))


class _Watchdog:
    """One daemon thread per transport (interpreter only): while a launch is armed past its deadline, it
    stores 1 into ``ctl[CTL_GIVE_UP]``."""

    def __init__(self, ctl: np.ndarray) -> None:
        import threading

        self.lock = threading.Lock()
        self.deadline: Optional[float] = None
        self._ctl = ctl
        threading.Thread(target=self._run, daemon=True, name="deep_ep-fused-watchdog").start()

    def _run(self) -> None:
        while True:
            time.sleep(0.02)
            with self.lock:
                if self.deadline is not None and time.monotonic() > self.deadline:
                    self._ctl[CTL_GIVE_UP] = 1


def _p2(n: int) -> int:
    n = max(int(n), 1)
    return 1 << (n - 1).bit_length()


def _interp() -> bool:
    from ...kernels.launch import interpreting

    return interpreting()
