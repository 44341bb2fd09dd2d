"""The nvlink transport's device path: dispatch and combine whose layout lives on the device.

A ``num_worst_tokens`` dispatch must not synchronise with the host (so that it
can be captured in a CUDA graph with fresh routing every replay). Its plan
carries ``device`` (:func:`deep_ep.layout.device_layout`): every
row's destination slot, computed on the device from the counts the ranks
published into each other's metadata areas (:meth:`publish_meta`). Such a
plan, and every plan of a dispatch where any rank passed
``num_worst_tokens``, moves rows this way (every rank decides the same):

- **dispatch** (push): each rank stores every token's row into its slot in
  each destination's staging half (its own rows straight into its output),
  one device barrier, then copies the received rows out of its own half,
  zeroing the padding rows up to ``num_worst_tokens``.
- **combine** (push): each rank returns the rows it received from source
  ``s`` as one block into ``s``'s staging, at the position of that block in
  ``s``'s send order; one barrier; each rank reduces (own rows read where
  they are in the combine input).

Row movement is a Triton kernel on a persistent grid of at most
``Config.num_sms`` programs (:mod:`deep_ep.kernels.scatter`), or its torch
twins (:mod:`deep_ep.kernels.twins`) where Triton is not available. The staging
must hold ``num_worst_tokens`` rows per received tensor (and, for a
combine, ``num_ranks * num_tokens`` rows) in the whole data area, used as
the host path's whole-area mode (a barrier before the call's writes and
before the next phase's); a call that does not fit raises
:class:`~deep_ep.errors.DeepEPInputError` naming the ``num_nvl_bytes`` needed.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ... import kernels
from ...errors import DeepEPInputError
from ...rows import Alloc, reduce_rows
from ..base import Plan


class NVLinkDevicePath:
    """Mixin of :class:`~deep_ep.transport.nvlink.transport.NVLinkTransport` (needs its staging helpers)."""

    #: the Buffer may build plans whose layout lives on the device (num_worst_tokens dispatch)
    device_layout = True

    def _device_setup(self) -> None:
        self._deltas: Dict[int, Optional[torch.Tensor]] = {}
        self._device_layouts: Dict[tuple, Tuple[int, List[int]]] = {}

    def _delta(self, word: int) -> Optional[torch.Tensor]:
        """int64 ``[R]``: words of ``word`` bytes from this rank's staging to each rank's, as this process
        maps them (``None`` if one is not a multiple of 16 words: the kernels then are not used)."""
        if word not in self._deltas:
            base = self.peers[self.rank].data_ptr()
            d = [p.data_ptr() - base for p in self.peers]
            ok = all(x % (16 * word) == 0 for x in d)
            self._deltas[word] = torch.tensor([x // word for x in d], dtype=torch.int64).to(self.device) if ok else None
        return self._deltas[word]

    def publish_meta(self, values: torch.Tensor) -> torch.Tensor:
        """Store ``values`` (int64 on the device) into slot ``rank`` of every rank's metadata area, pass a
        device barrier, and return this rank's area ``[R, n]`` on the device (nothing read on the host;
        valid until two more metadata exchanges)."""
        values = values.reshape(-1)
        n = values.numel()
        self._check_meta_len(n)
        parity = self.meta_seq % 2
        self.meta_seq += 1
        for p in range(self.num_ranks):
            self._meta(p, parity)[self.rank, :n].copy_(values)
        self._barrier()
        return self._meta(self.rank, parity)[:, :n]

    def _device_region_rows(self, widths: Sequence[int], full: bool) -> Tuple[int, List[int]]:
        """Rows per tensor region (the last is the spare row) and the regions' byte offsets, in a half or
        (``full``) in the whole data area."""
        key = (tuple(widths), full)
        got = self._device_layouts.get(key)
        if got is None:
            got = self._device_layouts[key] = self._layout(widths, 2 * self.half_bytes if full else 0)
        return got

    def _device_fits(self, rows: int, widths: Sequence[int], what: str) -> Tuple[int, List[int]]:
        """``(cap, offsets)`` of ``rows`` rows per tensor in the whole data area. Always the whole area:
        the mode must be the same on every rank, and the rows a rank needs (its ``num_worst_tokens``,
        its tokens) are not known to the others on the host."""
        cap, offsets = self._device_region_rows(widths, True)
        if rows > cap - 1:
            need = self.meta_bytes + sum(widths) * (rows + 1) + 256 * (len(widths) + 2)
            raise DeepEPInputError(
                f"deep_ep nvlink: {what} needs {rows} rows of {sum(widths)} bytes of staging, which holds "
                f"{cap - 1}; pass num_nvl_bytes >= {need} to the Buffer (on every rank)"
            )
        return cap, offsets

    def _kernel_ok(self, t: torch.Tensor) -> bool:
        return kernels.available(t)

    # ---------------------------------------------------------------- dispatch
    def _device_dispatch(
        self, plan: Plan, rows: Sequence[torch.Tensor], alloc: Alloc, words, num_sms: int
    ) -> List[torch.Tensor]:
        from .schedule import _capturing

        dl, me, R = plan.device, self.rank, self.num_ranks
        outs = [alloc((plan.num_out_rows,) + tuple(t.shape[1:]), t.dtype) for t in rows]
        if not rows:
            return outs
        src = [words(t) for t in rows]
        dst = [words(o) for o in outs]
        widths = tuple(t.size(1) * t.element_size() for t in src)
        cap, offsets = self._device_fits(plan.num_out_rows, widths, "this num_worst_tokens dispatch")
        self._graph = _capturing()
        start = self._begin_phase(True)
        fast = self._kernel_ok(src[0]) and all(self._delta(t.element_size()) is not None for t in src)
        slot = dl.slot
        if fast:  # every row tensor in one launch
            from ...kernels import scatter

            regions = [self._region(me, start + o, cap, w, sw.dtype) for sw, w, o in zip(src, widths, offsets)]
            scatter.scatter_rows(
                src,
                slot,
                dst,
                [r[: cap - 1] for r in regions],
                [self._delta(sw.element_size()) for sw in src],
                me,
                num_sms,
            )
            self._barrier()
            scatter.copy_out(regions, dst, dl.recv, num_sms)
        else:  # the kernels' torch twins, on every rank's region
            from ...kernels import twins

            regions = [
                [self._region(d, start + o, cap, w, sw.dtype)[: cap - 1] for d in range(R)]
                for sw, w, o in zip(src, widths, offsets)
            ]
            twins.scatter_rows_torch(src, slot, dst, regions, me)
            self._barrier()
            twins.copy_out_torch([r[me] for r in regions], dst, dl.recv)
        self._end_call(True)
        return outs

    # ---------------------------------------------------------------- combine
    def _device_combine(
        self,
        plan: Plan,
        srcs: List[torch.Tensor],
        biases: Sequence[torch.Tensor],
        alloc: Alloc,
        dtype: torch.dtype,
        words,
        codec=None,
        num_sms: int = 20,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        from .schedule import _capturing

        dl, me, R = plan.device, self.rank, self.num_ranks
        src = [words(t) for t in srcs]
        widths = tuple(t.size(1) * t.element_size() for t in src)
        cap, offsets = self._device_fits(R * plan.num_tokens, widths, "the combine of this num_worst_tokens handle")
        self._graph = _capturing()
        start = self._begin_phase(True)
        fast = self._kernel_ok(src[0]) and all(self._delta(t.element_size()) is not None for t in src)
        ret = dl.ret
        if fast:  # the rows and their weights in one launch
            from ...kernels import scatter

            scatter.return_blocks(
                src,
                ret,
                [self._region(me, start + o, cap - 1, w, sw.dtype) for sw, w, o in zip(src, widths, offsets)],
                [self._delta(sw.element_size()) for sw in src],
                me,
                num_sms,
            )
        else:  # the kernel's torch twin, on every rank's region
            from ...kernels import twins

            twins.return_blocks_torch(
                src,
                ret,
                [
                    [self._region(d, start + o, cap - 1, w, sw.dtype) for d in range(R)]
                    for sw, w, o in zip(src, widths, offsets)
                ],
                me,
            )
        self._barrier()
        backs = [
            self._region(me, start + o, cap, w, torch.uint8).view(t.dtype).view(cap, t.size(1))
            for t, w, o in zip(srcs, widths, offsets)
        ]
        pos = dl.combine_pos
        local = srcs[0]
        if codec is not None:  # rows at send positions < R * T; own rows decoded too
            backs[0] = codec.decode(backs[0][: R * plan.num_tokens], dtype)
            local = codec.decode(srcs[0], dtype)
        out = reduce_rows(backs[0], pos, biases, dtype, alloc, local=local, local_col=me)
        out_w = (
            reduce_rows(backs[1], pos, (), torch.float32, alloc, local=srcs[1], local_col=me) if len(srcs) > 1 else None
        )
        self._end_call(True)
        return out, out_w
