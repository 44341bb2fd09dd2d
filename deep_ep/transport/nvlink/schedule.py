"""The nvlink transport's schedules: what a dispatch or combine does, from the counts matrix alone.

Everything here depends only on the layout (the counts every rank agreed on),
the row widths and the staging size, so every rank computes the same rounds,
chunks and windows, and it is computed once per handle (kept in the plan).
:class:`NVLinkSchedules` is a mixin of :class:`~deep_ep.transport.nvlink.transport.NVLinkTransport`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch

from ... import layout
from ...errors import DeepEPError, DeepEPInputError
from ...streams import ints_to_device
from ..base import Plan, send_token_order

_ALIGN = 256


def _align(n: int, a: int = _ALIGN) -> int:
    return (n + a - 1) // a * a


#: chunks a one-round call is pipelined in (each a barrier), env ``DEEP_EP_NVLINK_CHUNKS``. One: on
#: 2 x H200 the torch-op path is bound by host time, and chunks (more launches, a side stream) made
#: the normal workload slower (docs/perf-notes.md).
DEFAULT_CHUNKS = 1
#: smallest chunk worth a barrier (bytes of the longest sequence of rows a rank sends)
MIN_CHUNK_BYTES = 4 << 20
#: the push dispatch's most runs of consecutive tokens to one peer (a copy each; more: the pull path)
MAX_PUSH_RUNS = 64
#: chunks of a push dispatch (env ``DEEP_EP_NVLINK_PUSH_CHUNKS``): the copy-out of one overlaps the
#: copies of the next
DEFAULT_PUSH_CHUNKS = 2


def _capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph."""
    try:
        return torch.cuda.is_current_stream_capturing()
    except Exception:  # pragma: no cover - no CUDA
        return False


def _not_while_capturing(op: str) -> None:
    if _capturing():
        raise DeepEPError(
            f"deep_ep nvlink: this {op} (handle and row shapes) has not run before; run it once "
            f"outside CUDA-graph capture (a warm-up), then capture it"
        )


def _split(n: int, k: int) -> List[int]:
    """Bounds of ``k`` near-equal parts of ``range(n)``."""
    return [n * c // k for c in range(k + 1)]


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


class NVLinkSchedules:
    """Schedule builders of the nvlink transport (needs ``rank``, ``num_ranks``, ``half_bytes``,
    ``nbytes``, ``meta_bytes``, ``chunks`` and ``min_chunk_bytes`` on the instance)."""

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
                f"{self.meta_bytes + 2 * (_ALIGN * (len(widths) + 1) + per_row)}"
            )
        while True:
            offsets, off = [], 0
            for w in widths:
                offsets.append(off)
                off = _align(off + cap * w)
            if off <= area:
                return cap, offsets
            cap -= 1  # alignment padding pushed past the end: one row fewer

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

    def _chunks_for(self, C: List[List[int]], widths: Sequence[int], rounds: int) -> int:
        """Chunks a call is pipelined in: several for one big round, else one (same on every rank)."""
        if rounds != 1:
            return 1
        longest = max(sum(C[s][d] for d in range(self.num_ranks) if d != s) for s in range(self.num_ranks))
        return max(1, min(self.chunks, longest * sum(widths) // max(self.min_chunk_bytes, 1)))

    def _shape(self, plan: Plan, widths: Sequence[int], op: str):
        """``(counts, full, cap, offsets, off, rounds, chunks, recv_first)`` of a call: the counts
        matrix as lists, the staging mode and windows (:meth:`_rounds`), the chunks, and where the
        rows from each source start in this rank's received rows."""
        _not_while_capturing(op)
        C = plan.counts.tolist()
        full, cap, offsets, off, rounds = self._rounds(C, widths)
        recv_first = [sum(C[s2][self.rank] for s2 in range(s)) for s in range(self.num_ranks)]
        return C, full, cap, offsets, off, rounds, self._chunks_for(C, widths, rounds), recv_first

    def _dispatch_schedule(self, plan: Plan, widths: Tuple[int, ...]) -> Dict[str, Any]:
        """What a dispatch of ``plan`` with rows of byte ``widths`` does, computed once per plan.

        ``steps[r]`` lists round ``r``'s chunks ``(token ids to pack, pulls)``; a pull
        ``(s, a, n, first)`` copies ``n`` rows from position ``a`` of rank ``s``'s staging
        window to output row ``first``.
        """
        key = ("nvlink_dispatch", widths)
        if key in plan.cache:
            return plan.cache[key]
        R, me = self.num_ranks, self.rank
        C, full, cap, offsets, off, rounds, k, recv_first = self._shape(plan, widths, "dispatch")
        idx = send_token_order(plan)
        starts = [0]
        for c in plan.send_counts:
            starts.append(starts[-1] + c)
        c_me = C[me][me]
        local = (idx[starts[me] : starts[me] + c_me], recv_first[me], c_me) if c_me else None
        nonself = torch.cat([idx[starts[d] : starts[d + 1]] for d in range(R) if d != me]) if R > 1 else idx[:0]
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
        plan.cache[key] = sched
        return sched

    def _push_schedule(self, plan: Plan, widths: Tuple[int, ...]) -> Any:
        """The push variant of a dispatch (``DEEP_EP_NVLINK_DISPATCH=push``), or ``None`` where it does
        not apply (every rank decides the same: it depends on the counts and on this rank's runs only
        through an agreement below).

        Each rank copies runs of consecutive tokens it sends to ``d`` straight from its input into
        ``d``'s staging (contiguous copies: the copy engines write over the link at its rate; no
        local pack), at the position of its block in ``d``'s received order; after each chunk's
        barrier, the receiver copies the chunk's rows out of its own staging into the output (on the
        side stream, beside the next chunk's copies). Applies when every rank's received rows fit
        one area and this rank sends at most ``MAX_PUSH_RUNS`` runs to each peer.
        """
        key = ("nvlink_push", widths)
        if key in plan.cache:
            return plan.cache[key]
        R, me = self.num_ranks, self.rank
        _not_while_capturing("dispatch")
        C = plan.counts.tolist()
        recv_other = [sum(C[s][d] for s in range(R) if s != d) for d in range(R)]
        cap, offsets = self._layout(widths)
        full = False
        if max(recv_other) > cap:
            cap, offsets = self._layout(widths, 2 * self.half_bytes)
            full = True
        sched = None
        if max(recv_other) <= cap and R > 1:
            idx = send_token_order(plan)
            starts = [0]
            for c in plan.send_counts:
                starts.append(starts[-1] + c)
            host = idx.tolist()
            runs: List[List[Tuple[int, int, int]]] = []  # per destination: (token, n, k0)
            for d in range(R):
                toks, rr = host[starts[d] : starts[d + 1]], []
                if d != me:
                    for k, t in enumerate(toks):
                        if rr and rr[-1][0] + rr[-1][1] == t:
                            rr[-1] = (rr[-1][0], rr[-1][1] + 1, rr[-1][2])
                        else:
                            rr.append((t, 1, k))
                runs.append(rr)
            ok = max(len(r) for r in runs) <= MAX_PUSH_RUNS
            if all(self.all_gather_ints(torch.tensor([int(ok)]), "nvlink push schedule")[:, 0].tolist()):
                inpos = [[sum(C[s2][d] for s2 in range(s) if s2 != d) for s in range(R)] for d in range(R)]
                recv_first = [sum(C[s2][me] for s2 in range(s)) for s in range(R)]
                longest = max(recv_other)
                kc = max(1, min(self.push_chunks, longest * sum(widths) // max(self.min_chunk_bytes, 1)))
                chunks = []
                for c in range(kc):
                    copies = []  # (d, token, n, row in d's staging)
                    for d in range(R):
                        if d == me or not C[me][d]:
                            continue
                        lo, hi = _split(C[me][d], kc)[c : c + 2]
                        for t0, n, k0 in runs[d]:
                            a, b = max(k0, lo), min(k0 + n, hi)
                            if a < b:
                                copies.append((d, t0 + a - k0, b - a, inpos[d][me] + a))
                    outs = []  # (row in my staging, n, output row)
                    for s in range(R):
                        if s == me or not C[s][me]:
                            continue
                        lo, hi = _split(C[s][me], kc)[c : c + 2]
                        if lo < hi:
                            outs.append((inpos[me][s] + lo, hi - lo, recv_first[s] + lo))
                    chunks.append((copies, outs))
                c_me = C[me][me]
                local = (idx[starts[me] : starts[me] + c_me], recv_first[me], c_me) if c_me else None
                sched = dict(full=full, cap=cap, offsets=offsets, local=local, chunks=chunks, views={})
        plan.cache[key] = sched
        return sched

    def _combine_schedule(self, plan: Plan, widths: Tuple[int, ...]) -> Dict[str, Any]:
        """What a combine of ``plan`` with rows of byte ``widths`` does, computed once per plan.

        ``steps[r]`` lists round ``r``'s chunks ``(pushes, rows that arrive)``; a push
        ``(s, a, n, first)`` copies my rows ``first..first+n`` to position ``a`` of rank
        ``s``'s window. ``ready[c]`` is the first token not complete after chunk ``c``
        (one-round calls).
        """
        key = ("nvlink_combine", widths)
        if key in plan.cache:
            return plan.cache[key]
        R, me = self.num_ranks, self.rank
        C, full, cap, offsets, off, rounds, k, recv_first = self._shape(plan, widths, "combine")
        n_back = off[me][R - 1] + (C[me][R - 1] if R - 1 != me else 0)  # non-self rows that come back to me
        steps = []
        for r in range(rounds):
            lo, hi = r * cap, (r + 1) * cap
            chunks = []
            for c in range(k):
                pushes = []
                for s in range(R):  # my rows from s go back into s's staging
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
        base_t = ints_to_device(base, torch.int64, slots.device)
        pos = torch.where(slots >= 0, slots + base_t, torch.full_like(slots, -1)).contiguous()
        sched = dict(full=full, cap=cap, offsets=offsets, steps=steps, n_back=n_back, pos=pos, ready=ready, views={})
        plan.cache[key] = sched
        return sched
