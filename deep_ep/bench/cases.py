"""The cases of one rank: deep_ep backends and the docs/bench.md baselines.

Every case records, per rank, its per-run times and the bytes its figures are
computed from; :mod:`deep_ep.bench.report` reduces the ranks. A case that
cannot run (a backend not implemented, a wire format not supported, symmetric
memory unavailable) is agreed on by every rank, then skipped with its reason:
no rank is left waiting in a collective the others never enter.
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable, Optional

import torch
import torch.distributed as dist

from deep_ep.bench.options import COMPRESSED_WIRES
from deep_ep.bench.timing import capture_graph
from deep_ep.bench.workload import Workload, row_bytes

logger = logging.getLogger(__name__)


def plan(cfg, backends: list) -> list:
    """The cases a run times, in order (for the progress bar).

    Args:
        cfg: the run's :class:`~deep_ep.bench.options.BenchConfig`.
        backends: the deep_ep backends of the run.

    Returns:
        ``[(tokens, backend, op, wire, timing), ...]``, baselines included.
    """
    out = []
    graphs = cfg.device == "cuda" and getattr(cfg, "graphs", True)
    for tokens in cfg.tokens:
        for b in backends:
            for wire in cfg.wires:
                out += [(tokens, b, "dispatch", wire, "cached"), (tokens, b, "dispatch", wire, "fresh")]
                if graphs:
                    # "worst": a fresh dispatch with num_worst_tokens (no host sync on nvlink), eager and
                    # replayed from a CUDA graph with its layout computation
                    out += [(tokens, b, "dispatch", wire, t) for t in ("graph", "worst", "worst-graph")]
            for level in getattr(cfg, "compression", ()):
                wire = COMPRESSED_WIRES[level]
                out.append((tokens, b, "dispatch", wire, "cached"))
                if graphs:
                    out.append((tokens, b, "dispatch", wire, "graph"))
            out.append((tokens, b, "combine", "bf16", "cached"))
            if graphs:
                out.append((tokens, b, "combine", "bf16", "graph"))
        if cfg.baselines:
            for name in [cfg.raw_name] + (["peer-copy"] if cfg.device == "cuda" else []):
                out += [(tokens, name, "dispatch", wire, "cached") for wire in cfg.wires]
                out.append((tokens, name, "combine", "bf16", "cached"))
    return out


def _one_line(exc: BaseException) -> str:
    """First line of ``TypeName: message`` of an exception (a skip reason)."""
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0] if text else type(exc).__name__


def agree_error(error: Optional[str], group=None) -> Optional[str]:
    """All-gather each rank's error over ``group`` (collective: every rank calls it).

    Args:
        error: this rank's error (``None`` if it is fine).
        group: the process group that agrees (a gloo one where the data group is NCCL).

    Returns:
        The first rank's error as ``"rank r: error"``, or ``None`` when every rank is fine.
    """
    errors = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, error, group=group)
    for r, e in enumerate(errors):
        if e is not None:
            return f"rank {r}: {e}"
    return None


def open_agreed(make: Callable[[], object], group=None) -> tuple:
    """Run ``make()`` on every rank (e.g. make a ``Buffer``) and agree on the outcome.

    Args:
        make: what every rank runs.
        group: the process group that agrees.

    Returns:
        ``(result, None)`` when it worked on every rank, else ``(None, reason naming the rank)``.
    """
    try:
        result, err = make(), None
    except Exception as exc:  # the reason every rank reports
        result, err = None, _one_line(exc)
        logger.debug("setup failed", exc_info=True)
    reason = agree_error(err, group)
    return (None, reason) if reason else (result, None)


class RankRunner:
    """Runs the cases of one rank and collects ``records`` and ``skipped``."""

    def __init__(self, cfg, rank: int, group, ctrl, device: torch.device, timer, progress):
        """Set up the runner of one rank.

        Args:
            cfg: the run.
            rank: this rank.
            group: the process group that carries the data (NCCL or gloo).
            ctrl: a gloo group for agreement.
            device: this rank's device.
            timer: a :class:`~deep_ep.bench.timing.CudaTimer` or :class:`~deep_ep.bench.timing.CpuTimer`.
            progress: ``update(n)`` of the progress bar.
        """
        self.cfg, self.rank, self.group, self.ctrl = cfg, rank, group, ctrl
        self.device, self.timer, self.progress = device, timer, progress
        self.records: list = []
        self.skipped: list = []
        self.buffers: dict = {}
        self._symm = None  # (handle, slot_bytes) once peer-copy is set up
        self._symm_error: Optional[str] = None

    # -- agreement ---------------------------------------------------------------------------
    def agree(self, error: Optional[str]) -> Optional[str]:
        """All-gather each rank's error (collective).

        Args:
            error: this rank's error, ``None`` if fine.

        Returns:
            The first one, naming its rank, or ``None``.
        """
        return agree_error(error, self.ctrl)

    def try_agreed(self, fn: Callable[[], object]):
        """Run ``fn`` on every rank and agree on the outcome (collective).

        Args:
            fn: what every rank runs.

        Returns:
            ``(result, None)`` if it worked everywhere, else ``(None, reason)``.
        """
        return open_agreed(fn, self.ctrl)

    def skip(self, cases: list, reason: str) -> None:
        """Record ``cases`` as skipped and advance the progress bar.

        Args:
            cases: tuples of :func:`plan`.
            reason: why they cannot run (the same on every rank).
        """
        for tokens, backend, op, wire, timing in cases:
            self.skipped.append(dict(backend=backend, op=op, wire=wire, tokens=tokens, timing=timing, reason=reason))
        self.progress(len(cases))

    def record(
        self, case: tuple, times: list, rows: int, remote_rows: Optional[int], link_rows: int, rb: int, **extra
    ) -> None:
        """Store one measured case of this rank and advance the progress bar.

        Args:
            case: a tuple of :func:`plan`.
            times: per-run microseconds.
            rows: rows received (``None`` for the peer-copy baseline).
            remote_rows: rows received from other ranks.
            link_rows: rows that crossed to another rank (the link bytes' rows).
            rb: bytes per row on the wire.
            extra: more keys of the record (``num_sms``, ``transport``, codec figures).
        """
        tokens, backend, op, wire, timing = case
        self.records.append(
            dict(
                backend=backend,
                op=op,
                wire=wire,
                tokens=tokens,
                timing=timing,
                times_us=times,
                bytes_logical=None if rows is None else rows * rb,
                bytes_link=link_rows * rb,
                recv_rows=rows,
                remote_rows=remote_rows,
                **extra,
            )
        )
        self.progress(1)

    def time(self, fn: Callable[[], object]) -> list:
        """Time ``fn`` with the configured timer.

        Args:
            fn: the call.

        Returns:
            Per-run microseconds (``cfg.iters`` of them, after ``cfg.warmup``).
        """
        return self.timer(fn, self.cfg.iters, self.cfg.warmup)

    # -- deep_ep backends -------------------------------------------------------------------
    def _nvl_bytes(self, deep_ep) -> int:
        """``num_nvl_bytes`` as DeepEP users size it (max of the dispatch/combine config hints)."""
        R, hidden_bytes = self.cfg.world_size, 2 * self.cfg.hidden
        try:
            return max(
                c.get_nvl_buffer_size_hint(hidden_bytes, R)
                for c in (deep_ep.Buffer.get_dispatch_config(R), deep_ep.Buffer.get_combine_config(R))
            )
        except Exception as exc:
            logger.debug("no nvl size hint (%s); using 1e9 bytes", exc)
            return int(1e9)

    def open_backend(
        self, name: str, unsupported: Optional[str], nvl_bytes: Optional[int] = None, key: Optional[str] = None
    ):
        """Create (once) the ``Buffer`` of backend ``name`` on every rank (collective).

        Args:
            name: the backend.
            unsupported: the reason deep_ep's own rule rejects it for this group, or ``None``.
            nvl_bytes: ``num_nvl_bytes`` of a second Buffer (default: DeepEP's size hint).
            key: the name the second Buffer is kept under.

        Returns:
            ``(buffer, None)`` or ``(None, skip reason naming the rank)``.
        """
        key = key or name
        if key in self.buffers:
            return self.buffers[key]
        if unsupported:  # deep_ep's own rule rejects it for this group (same answer on every rank)
            self.buffers[key] = (None, unsupported)
            return self.buffers[key]

        def make():
            import deep_ep

            if self.cfg.num_sms is not None:
                deep_ep.Buffer.set_num_sms(self.cfg.num_sms)
            return deep_ep.Buffer(self.group, nvl_bytes or self._nvl_bytes(deep_ep), 0, backend=name)

        self.buffers[key] = self.try_agreed(make)
        return self.buffers[key]

    def _rows(self, recv_x, handle) -> tuple:
        """``(rows received, rows received from other ranks)`` of a dispatch result."""
        x = recv_x[0] if isinstance(recv_x, tuple) else recv_x
        prefix = handle[0].cpu()
        r = self.rank
        own = int(prefix[r, r]) - (int(prefix[r - 1, r]) if r > 0 else 0)
        return x.shape[0], x.shape[0] - own

    def run_backend(self, name: str, wl: Workload, unsupported: Optional[str]) -> None:
        """Time cached dispatch, fresh dispatch (layout + dispatch) and combine of one backend (and, on CUDA,
        their graph-replayed and ``num_worst_tokens`` variants).

        Args:
            name: the backend.
            wl: this rank's workload.
            unsupported: the reason it cannot run here, or ``None``.
        """
        cfg = self.cfg
        cases = [c for c in plan(cfg, [name]) if c[0] == wl.tokens and c[1] == name]
        buf, reason = self.open_backend(name, unsupported)
        if reason:
            self.skip(cases, reason)
            return
        import deep_ep

        num_sms = getattr(deep_ep.Buffer, "num_sms", None)
        transport = getattr(buf, "backend", name)  # what 'auto' resolved to
        expected = sum(wl.recv_counts)
        bf16_out = None
        for wire in cfg.wires:
            x = wl.dispatch_input(wire)

            def fresh(x=x):
                ntpr, ntpr_rdma, ntpe, in_rank, _ = buf.get_dispatch_layout(wl.topk_idx, cfg.experts)
                return buf.dispatch(
                    x,
                    num_tokens_per_rank=ntpr,
                    num_tokens_per_rdma_rank=ntpr_rdma,
                    is_token_in_rank=in_rank,
                    num_tokens_per_expert=ntpe,
                    topk_idx=wl.topk_idx,
                    topk_weights=wl.topk_weights,
                )

            out, reason = self.try_agreed(fresh)
            wire_cases = [c for c in cases if c[2] == "dispatch" and c[3] == wire]
            if reason:
                self.skip(wire_cases, reason)
                continue
            recv_x, handle = out[0], out[4]
            rows, remote = self._rows(recv_x, handle)
            if rows != expected:
                logger.warning(
                    "%s %s dispatch on rank %d received %d rows, expected %d", name, wire, self.rank, rows, expected
                )
            rb = row_bytes(wire, cfg.hidden)
            extra = dict(num_sms=num_sms, expected_rows=expected, transport=transport)
            cached_case, fresh_case = wire_cases[:2]
            times = self.time(lambda: buf.dispatch(x, handle=handle))
            self.record(cached_case, times, rows, remote, remote, rb, **extra)
            times = self.time(fresh)
            self.record(fresh_case, times, rows, remote, remote, rb, **extra)
            if len(wire_cases) > 2:
                self.run_graph(name, wire_cases[2], lambda: buf.dispatch(x, handle=handle), rows, remote, rb, extra)
            if len(wire_cases) > 4:
                # DeepEP's worst case (every token of every rank), in a Buffer whose staging holds it
                worst = cfg.world_size * wl.tokens
                wbuf, reason = self.open_backend(
                    name, None, (worst + 2) * (rb + 24 * cfg.topk + 1024) + (64 << 20), key=name + ":worst"
                )

                def fresh_worst(x=x, buf=wbuf):
                    ntpr, ntpr_rdma, ntpe, in_rank, _ = buf.get_dispatch_layout(wl.topk_idx, cfg.experts)
                    return buf.dispatch(
                        x,
                        num_tokens_per_rank=ntpr,
                        num_tokens_per_rdma_rank=ntpr_rdma,
                        is_token_in_rank=in_rank,
                        num_tokens_per_expert=ntpe,
                        topk_idx=wl.topk_idx,
                        topk_weights=wl.topk_weights,
                        num_worst_tokens=worst,
                    )

                if not reason:
                    _, reason = self.try_agreed(fresh_worst)
                if reason:
                    self.skip(wire_cases[3:5], reason)
                else:
                    self.record(wire_cases[3], self.time(fresh_worst), rows, remote, remote, rb, **extra)
                    self.run_graph(name, wire_cases[4], fresh_worst, rows, remote, rb, extra)
            if wire == "bf16":
                bf16_out = (recv_x, handle, rows, remote)
            del out
        if cfg.compression:
            self.run_compressed(
                name, cases, bf16_out, wl, extra_base=dict(num_sms=num_sms, expected_rows=expected, transport=transport)
            )
        combine_cases = [c for c in cases if c[2] == "combine"]
        if bf16_out is None:
            self.skip(
                combine_cases,
                "no bf16 dispatch to combine"
                if "bf16" in cfg.wires
                else "combine is timed with the bf16 dispatch (add --dtype both)",
            )
            return
        recv_x, handle, rows, remote = bf16_out
        _, reason = self.try_agreed(lambda: buf.combine(recv_x, handle))
        if reason:
            self.skip(combine_cases, reason)
            return
        times = self.time(lambda: buf.combine(recv_x, handle))
        extra = dict(num_sms=num_sms, expected_rows=expected, transport=transport)
        rb = row_bytes("bf16", cfg.hidden)
        self.record(combine_cases[0], times, rows, remote, remote, rb, **extra)
        if len(combine_cases) > 1:
            self.run_graph(name, combine_cases[1], lambda: buf.combine(recv_x, handle), rows, remote, rb, extra)

    def run_compressed(self, name: str, cases: list, bf16_out, wl: Workload, extra_base: dict) -> None:
        """Time the cached dispatch of the bf16 rows compressed by deep_ep at each ``--compression`` level (the
        wire bytes per row are the codec's); each row carries the codec's relative L2 error on these rows.

        Args:
            name: the backend.
            cases: its planned cases.
            bf16_out: ``(recv_x, handle, rows, remote)`` of its bf16 dispatch, or ``None``.
            wl: this rank's workload.
            extra_base: keys every record gets.
        """
        from deep_ep.compress import make_codec, relative_error

        cfg, buf = self.cfg, self.buffers[name][0]
        for level in cfg.compression:
            wire = COMPRESSED_WIRES[level]
            wcases = [c for c in cases if c[2] == "dispatch" and c[3] == wire]
            if bf16_out is None:
                self.skip(wcases, "compressed dispatch is timed with the bf16 handle (add bf16 to --dtype)")
                continue
            _, handle, rows, remote = bf16_out
            compress = cfg.compression_ratio if level == "auto" else level
            codec = make_codec(level, cfg.hidden, ratio=cfg.compression_ratio)
            err = relative_error(wl.x.float(), codec.roundtrip(wl.x).float())
            extra = dict(
                extra_base,
                compression_level=level,
                rel_err_mean=float(err.mean()),
                rel_err_max=float(err.max()),
                wire_row_bytes=codec.row_bytes,
            )

            def fn(compress=compress):
                return buf.dispatch(wl.x, handle=handle, compress=compress)

            _, reason = self.try_agreed(fn)
            if reason:
                self.skip(wcases, reason)
                continue
            self.record(wcases[0], self.time(fn), rows, remote, remote, codec.row_bytes, **extra)
            if len(wcases) > 1:
                self.run_graph(name, wcases[1], fn, rows, remote, codec.row_bytes, extra)

    def run_graph(self, name: str, case: tuple, fn: Callable[[], object], rows, remote, rb, extra) -> None:
        """Time ``fn`` replayed from a CUDA graph: the GPU-side time of the call without its Python launch cost.
        The nvlink transport supports capture; others are skipped.

        Args:
            name: the backend.
            case: the planned case.
            fn: a cached-handle call, or a ``num_worst_tokens`` dispatch.
            rows, remote, rb, extra: as :meth:`record` takes them.
        """
        if name not in ("nvlink", "auto") or getattr(self.buffers.get(name, (None,))[0], "backend", "") != "nvlink":
            self.skip([case], "CUDA-graph capture is supported by the nvlink transport only")
            return

        g, reason = self.try_agreed(lambda: capture_graph(fn))
        if reason:
            self.skip([case], reason)
            return
        times = self.time(g.replay)
        self.record(case, times, rows, remote, remote, rb, **extra)
        del g

    # -- baselines ---------------------------------------------------------------------------
    def run_raw(self, wl: Workload) -> None:
        """``nccl-raw`` / ``gloo-raw``: one ``all_to_all_single`` of exactly the rows that move.

        Args:
            wl: this rank's workload.
        """
        cfg, name = self.cfg, self.cfg.raw_name
        recv_rows, remote = sum(wl.recv_counts), wl.remote_recv_rows(self.rank)
        jobs = [((wl.tokens, name, "dispatch", w, "cached"), w, wl.send_counts, wl.recv_counts) for w in cfg.wires]
        jobs.append(((wl.tokens, name, "combine", "bf16", "cached"), "bf16", wl.recv_counts, wl.send_counts))
        for case, wire, send, recv in jobs:
            rb = row_bytes(wire, cfg.hidden)
            inp = torch.empty(sum(send) * rb, dtype=torch.uint8, device=self.device)
            out = torch.empty(sum(recv) * rb, dtype=torch.uint8, device=self.device)
            in_split, out_split = [c * rb for c in send], [c * rb for c in recv]

            def fn(inp=inp, out=out, in_split=in_split, out_split=out_split):
                dist.all_to_all_single(out, inp, out_split, in_split, group=self.group)

            _, reason = self.try_agreed(fn)
            if reason:
                self.skip([case], reason)
                continue
            self.record(case, self.time(fn), recv_rows, remote, remote, rb, num_sms=None)

    def _peer_setup(self, slot_bytes: int):
        """Symmetric-memory buffer of ``R * slot_bytes`` bytes on every rank, rendezvoused."""
        import torch.distributed._symmetric_memory as symm_mem

        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:  # needed by older torch; deprecated (a no-op) since
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                enable(self.group.group_name)
        t = symm_mem.empty(self.cfg.world_size * slot_bytes, dtype=torch.uint8, device=self.device)
        return t, symm_mem.rendezvous(t, self.group)

    def run_peer_copy(self, wl: Workload) -> None:
        """``peer-copy``: copy the same remote bytes into each peer's symmetric buffer (GPU only).

        Args:
            wl: this rank's workload.
        """
        cfg, name = self.cfg, "peer-copy"
        cases = [(wl.tokens, name, "dispatch", w, "cached") for w in cfg.wires]
        cases.append((wl.tokens, name, "combine", "bf16", "cached"))
        if self._symm is None and self._symm_error is None:
            slot = max(cfg.tokens) * row_bytes("bf16", cfg.hidden)
            res, self._symm_error = self.try_agreed(lambda: self._peer_setup(slot))
            if res is not None:
                self._symm = (res[0], res[1], slot)
        if self._symm_error:
            self.skip(cases, f"symmetric memory: {self._symm_error}")
            return
        _, hdl, slot = self._symm
        r = self.rank
        for case in cases:
            wire = case[3]
            rb = row_bytes(wire, cfg.hidden)
            counts = wl.send_counts if case[2] == "dispatch" else wl.recv_counts
            peers = [j for j in range(cfg.world_size) if j != r and counts[j] > 0]
            src = torch.empty(max(1, sum(counts[j] for j in peers) * rb), dtype=torch.uint8, device=self.device)

            def views():
                pairs, off = [], 0
                for j in peers:
                    n = counts[j] * rb
                    dst = hdl.get_buffer(j, (n,), torch.uint8, r * slot)
                    pairs.append((dst, src[off : off + n]))
                    off += n
                return pairs

            pairs, reason = self.try_agreed(views)
            if reason:
                self.skip([case], f"symmetric memory: {reason}")
                continue

            def fn(pairs=pairs):
                for dst, s in pairs:
                    dst.copy_(s, non_blocking=True)

            times = self.time(fn)
            hdl.barrier()
            pushed = sum(counts[j] for j in peers)
            self.record(case, times, None, None, pushed, rb, num_sms=None)
