"""``ExpertParallelMoE``: a Mixture-of-Experts layer over a :class:`~deep_ep.Buffer` (docs/api.md, ExpertParallelMoE).

Router (softmax or sigmoid scores, top-k, optionally group-limited as
DeepSeek-V3), dispatch, the rank's local experts (SwiGLU, one grouped GEMM
per projection with ``torch._grouped_mm`` on Hopper GPUs, a loop over experts
elsewhere), routing weights, combine, optional shared experts. Differentiable
end to end through :mod:`deep_ep.ops`; rank ``r`` owns experts
``r*L .. (r+1)*L-1``; the router and shared experts are replicated (average
their gradients across ranks as for data parallelism).

**Overlap** (``num_chunks > 1``, forward, CUDA): the tokens are split into
chunks; the dispatch of chunk ``c+1`` and the combine of chunk ``c-1`` run on
the Buffer's communication stream (``async_finish`` + events) while chunk
``c``'s experts run on the compute stream, and the shared experts run while
the first dispatch is in flight. A fresh dispatch reads its metadata on the
host, and that read waits for what the communication stream already holds
(the previous chunk's combine): so on the collective transport the dispatch
of chunk ``c+1`` overlaps the experts of chunk ``c`` and the combines
overlap little. On nvlink the chunks are dispatched with
``num_worst_tokens`` (the device path: no host read per chunk; one exchange
of the largest token count per forward).
Backward (``num_chunks > 1``) is pipelined the same way: the gradient
dispatch of chunk ``c+1`` runs while chunk ``c``'s experts differentiate.
The experts' forward and backward are written out for the chunks (SwiGLU,
the activation's gradient in float32): a chunk's backward computes only the
gradients that travel back (rows, routing weights); the expert weight
gradients are formed once, after the last chunk, from every chunk's rows
regrouped by expert (one grouped GEMM per weight, not one full-size
gradient per chunk summed).
With ``num_chunks == 1`` the same code runs as one chunk with nothing
overlapped (the shared experts run before the dispatch; the dispatch reads its
counts on the host, so a call larger than the nvlink staging runs in rounds).
Chunking changes a token's result only by
the rounding of matrix products over other batches of rows (each row meets
the same experts and the sums run in a fixed order; measured: float64
results equal to 1e-12 relative).

**Statistics** (``record_stats=True``): :attr:`stats` after each forward and
:attr:`backward_stats` after each backward (``stats + backward_stats``: the
layer's share of a training step): ``step_us``, ``compute_us`` (router,
experts, shared experts, weighting, gradients on the compute stream),
``exposed_comm_us = step_us - compute_us`` (time the compute stream waited
for communication, or the host for its metadata) and ``comm_us`` (time the
communication stream was busy, from when its work was queued), so
``overlapped_comm_us = comm_us - exposed_comm_us``. CUDA events on GPU (one
host sync per forward and per backward to read them), wall clock on CPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..buffer import Buffer
from ..errors import DeepEPInputError
from ..rows import reduce_rows
from ..settings import DEFAULT_TIMEOUT_S
from ..waiting import agree_verdicts
from .experts import _acc, _gmm, _gmm_weight_grad, _silu_grad, _swiglu, dense_moe_reference, route_tokens
from .pipeline import _Pipeline, _record, chunk_layouts

__all__ = ["ExpertParallelMoE", "MoEStats", "route_tokens", "dense_moe_reference"]


@dataclass
class MoEStats:
    """Time split of one forward (microseconds); see the module docstring."""

    step_us: float = 0.0
    compute_us: float = 0.0
    comm_us: float = 0.0

    @property
    def exposed_comm_us(self) -> float:
        """Time the compute stream waited for communication: ``step_us - compute_us`` (not below 0)."""
        return max(self.step_us - self.compute_us, 0.0)

    @property
    def overlapped_comm_us(self) -> float:
        """Communication time hidden behind compute: ``comm_us - exposed_comm_us`` (not below 0)."""
        return max(self.comm_us - self.exposed_comm_us, 0.0)

    def __add__(self, other: "MoEStats") -> "MoEStats":
        """The split of two spans run one after the other (e.g. a forward and its backward: a training
        step's share of this layer): step, compute and communication times add."""
        return MoEStats(
            step_us=self.step_us + other.step_us,
            compute_us=self.compute_us + other.compute_us,
            comm_us=self.comm_us + other.comm_us,
        )

    def as_dict(self) -> dict:
        """All five figures as a plain dict (for JSON)."""
        return dict(
            step_us=self.step_us,
            compute_us=self.compute_us,
            comm_us=self.comm_us,
            exposed_comm_us=self.exposed_comm_us,
            overlapped_comm_us=self.overlapped_comm_us,
        )


class _Timer:
    """Spans on the compute stream and on the comm stream: CUDA events, or wall clock on CPU."""

    def __init__(self, enabled: bool, cuda: bool, comm: Optional[torch.cuda.Stream]) -> None:
        self.enabled, self.cuda, self.comm = enabled, cuda, comm
        self.compute: List[tuple] = []
        self.comms: List[tuple] = []
        self._t0 = None

    def _mark(self, stream=None):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(stream) if stream is not None else ev.record()
            return ev
        return time.perf_counter()

    def start(self):
        if self.enabled:
            self._t0 = self._mark()

    def span(self, kind: str):
        """Context measuring a span of ``kind`` ('compute' or 'comm')."""
        timer = self

        class _Span:
            def __enter__(self_):
                if timer.enabled:  # (no stream dependency added: that would change what overlaps)
                    self_.a = timer._mark(timer.comm if kind == "comm" and timer.cuda else None)
                return self_

            def __exit__(self_, *exc):
                if timer.enabled:
                    b = timer._mark(timer.comm if kind == "comm" and timer.cuda else None)
                    (timer.compute if kind == "compute" else timer.comms).append((self_.a, b))

        return _Span()

    def finish(self) -> Optional[MoEStats]:
        if not self.enabled:
            return None
        end = self._mark()
        if self.cuda:
            end.synchronize()
            torch.cuda.synchronize()

            def us(a, b):
                return a.elapsed_time(b) * 1000.0
        else:

            def us(a, b):
                return (b - a) * 1e6

        return MoEStats(
            step_us=us(self._t0, end),
            compute_us=sum(us(a, b) for a, b in self.compute),
            comm_us=sum(us(a, b) for a, b in self.comms),
        )


def _check_layer_args(R, num_experts, top_k, num_chunks, n_group, topk_group, score_func) -> None:
    """Raise :class:`DeepEPInputError` for arguments of :class:`ExpertParallelMoE` that cannot work."""
    if num_experts % R:
        raise DeepEPInputError(f"num_experts={num_experts} is not a multiple of the group size {R}")
    if not 1 <= top_k <= num_experts:
        raise DeepEPInputError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    if num_chunks < 1:
        raise DeepEPInputError(f"num_chunks must be >= 1, got {num_chunks}")
    if num_experts % n_group or not 1 <= topk_group <= n_group or top_k > topk_group * (num_experts // n_group):
        raise DeepEPInputError(
            f"group-limited routing needs n_group | num_experts and top_k <= topk_group * "
            f"experts per group (n_group={n_group}, topk_group={topk_group})"
        )
    if score_func not in ("softmax", "sigmoid"):
        raise DeepEPInputError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")


class ExpertParallelMoE(nn.Module):
    """An MoE layer whose experts are spread over the ranks of ``group`` (see the module docstring).

    Arguments: ``hidden``, ``ffn_hidden`` (per expert), ``num_experts``
    (a multiple of the group size), ``top_k``; keyword: ``group`` (default
    world), ``num_shared_experts``, ``num_chunks`` (overlap), ``n_group`` /
    ``topk_group`` (group-limited routing: the top ``topk_group`` of ``n_group``
    expert groups by their best score), ``score_func`` ('softmax' or
    'sigmoid'), ``norm_topk_prob``, ``routed_scaling_factor``, ``buffer`` (a
    Buffer to use; default one per layer, ``backend``), ``record_stats``,
    ``dtype``, ``device``. ``forward(x [T, hidden]) -> [T, hidden]``.
    """

    def __init__(
        self,
        hidden: int,
        ffn_hidden: int,
        num_experts: int,
        top_k: int,
        *,
        group: Optional[dist.ProcessGroup] = None,
        num_shared_experts: int = 0,
        num_chunks: int = 1,
        n_group: int = 1,
        topk_group: int = 1,
        score_func: str = "softmax",
        norm_topk_prob: bool = False,
        routed_scaling_factor: float = 1.0,
        buffer: Optional[Buffer] = None,
        backend: str = "auto",
        record_stats: bool = False,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.group = group if group is not None else dist.group.WORLD
        self.num_ranks = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        problem: Optional[BaseException] = None
        try:  # checked first, the verdicts exchanged (bounded) before the Buffer's collective construction
            _check_layer_args(self.num_ranks, num_experts, top_k, num_chunks, n_group, topk_group, score_func)
        except DeepEPInputError as e:
            problem = e
        agree_verdicts(self.group, problem, "ExpertParallelMoE()", DEFAULT_TIMEOUT_S)
        self.hidden, self.ffn_hidden, self.num_experts, self.top_k = hidden, ffn_hidden, num_experts, top_k
        self.num_local = num_experts // self.num_ranks
        self.num_chunks, self.n_group, self.topk_group = num_chunks, n_group, topk_group
        self.score_func, self.norm_topk_prob, self.routed_scaling_factor = (
            score_func,
            norm_topk_prob,
            routed_scaling_factor,
        )
        kw = dict(dtype=dtype, device=device)
        self.router = nn.Linear(hidden, num_experts, bias=False, **kw)
        L = self.num_local
        self.w_gate_up = nn.Parameter(torch.empty((L, 2 * ffn_hidden, hidden), **kw))
        self.w_down = nn.Parameter(torch.empty((L, hidden, ffn_hidden), **kw))
        nn.init.normal_(self.w_gate_up, std=1.0 / math.sqrt(hidden))
        nn.init.normal_(self.w_down, std=1.0 / math.sqrt(ffn_hidden))
        if num_shared_experts:
            F_s = ffn_hidden * num_shared_experts
            self.shared_gate_up = nn.Parameter(torch.randn((2 * F_s, hidden), **kw) / math.sqrt(hidden))
            self.shared_down = nn.Parameter(torch.randn((hidden, F_s), **kw) / math.sqrt(F_s))
        else:
            self.shared_gate_up = self.shared_down = None
        self.buffer = buffer if buffer is not None else Buffer(self.group, backend=backend)
        self.record_stats = record_stats
        self.stats: Optional[MoEStats] = None
        self.backward_stats: Optional[MoEStats] = None

    # ------------------------------------------------------------------ routing
    def route(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(topk_idx int64 [T, k], topk_weights float32 [T, k])`` of the tokens ``x``."""
        return route_tokens(
            x,
            self.router.weight,
            self.top_k,
            self.n_group,
            self.topk_group,
            self.score_func,
            self.norm_topk_prob,
            self.routed_scaling_factor,
        )

    # ------------------------------------------------------------------ experts
    def _grouped(self, x: torch.Tensor) -> bool:
        return (
            x.is_cuda
            and x.dtype == torch.bfloat16
            and hasattr(torch, "_grouped_mm")
            and self.hidden % 8 == 0
            and self.ffn_hidden % 8 == 0  # 16-byte strides
            and torch.cuda.get_device_capability(x.device) >= (9, 0)
        )

    def local_experts(self, rx: torch.Tensor, ridx: torch.Tensor, rw: torch.Tensor) -> torch.Tensor:
        """Rows ``[N, H]`` received with local expert ids ``[N, k]`` (-1 = none) and weights: for each row,
        ``sum_k w * expert_k(row)`` in float32 (float64 rows: float64) in ``k`` order, cast to the row dtype."""
        N, K = ridx.shape
        H = rx.size(1)
        pairs, counts, offs = self._pack(ridx)
        grouped = self._grouped(rx)
        host = None if grouped else counts.tolist()
        xs = rx.index_select(0, torch.div(pairs, K, rounding_mode="floor"))
        gate, up = _gmm(xs, self.w_gate_up, offs, host, grouped).chunk(2, dim=-1)
        out = _gmm(F.silu(gate) * up, self.w_down, offs, host, grouped)
        acc = _acc(rx.dtype)
        out = out.to(acc) * rw.reshape(-1).to(acc).index_select(0, pairs).unsqueeze(1)
        dense = torch.zeros((N * K, H), dtype=acc, device=rx.device).index_copy(0, pairs, out)
        return dense.view(N, K, H).sum(dim=1).to(rx.dtype)

    def _pack(self, ridx: torch.Tensor):
        """The (row, k) pairs of received rows with a local expert, sorted by expert (stable): ``pairs`` (flat
        ``row * K + k``), per-expert ``counts`` (device) and ``offs`` (int32 ends). One host sync: the number
        of pairs."""
        return self._pack_finish(self._pack_start(ridx))

    def _pack_start(self, ridx: torch.Tensor, consumer: Optional["torch.cuda.Stream"] = None) -> dict:
        """The device half of :meth:`_pack`, queued on the current stream; on CUDA the number of pairs is
        copied to pinned memory behind an event, so :meth:`_pack_finish` waits only for this work (the
        chunked pipeline runs it on the communication stream right after the chunk's dispatch, not behind
        the previous chunk's experts). ``consumer``: the stream that will use the results."""
        L = self.num_local
        flat = ridx.reshape(-1)
        key = torch.where(flat >= 0, flat, torch.full_like(flat, L))
        order = torch.sort(key, stable=True).indices
        counts = torch.bincount(key, minlength=L + 1)[:L]
        pk = dict(order=order, counts=counts, offs=torch.cumsum(counts, 0).to(torch.int32), event=None)
        if ridx.is_cuda:
            host = torch.empty((1,), dtype=torch.int64, pin_memory=True)
            host.copy_(counts.sum().view(1), non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            pk.update(host=host, event=ev)
            if consumer is not None:
                for t in (order, counts, pk["offs"]):
                    t.record_stream(consumer)
        return pk

    @staticmethod
    def _pack_finish(pk: dict):
        """``(pairs, counts, offs)`` of a :meth:`_pack_start` (waits for its event on CUDA)."""
        if pk["event"] is not None:
            pk["event"].synchronize()  # (the rows to compute: a host read)
            torch.cuda.current_stream().wait_event(pk["event"])
            P = int(pk["host"][0])
        else:
            P = int(pk["counts"].sum())
        return pk["order"][:P], pk["counts"], pk["offs"]

    @staticmethod
    def _weighted_sum(o: torch.Tensor, pairs: torch.Tensor, N: int, K: int, out_dtype: torch.dtype) -> torch.Tensor:
        """``out[n] = sum_k o[pair (n, k)]`` (pairs without a row count 0), summed in float32 (float64 for
        float64) in ``k`` order and cast to ``out_dtype``: the combine's deterministic reduction (one Triton
        pass on CUDA; no ``[N, K, H]`` intermediate, no atomics)."""
        pos = torch.full((N * K,), -1, dtype=torch.int64, device=o.device)
        pos.index_copy_(0, pairs, torch.arange(pairs.numel(), device=o.device))
        return reduce_rows(
            o, pos.view(N, K), (), out_dtype, lambda shape, dtype: torch.empty(shape, dtype=dtype, device=o.device)
        )

    def _experts_forward(self, rx: torch.Tensor, ridx: torch.Tensor, rw: torch.Tensor, pk: Optional[dict] = None):
        """:meth:`local_experts` without autograd, keeping what :meth:`_experts_backward` needs (``pk``: a
        :meth:`_pack_start` of ``ridx`` already queued)."""
        N, K = ridx.shape
        pairs, counts, offs = self._pack_finish(pk) if pk is not None else self._pack(ridx)
        grouped = self._grouped(rx)
        host = None if grouped else counts.tolist()
        tok = torch.div(pairs, K, rounding_mode="floor")
        xs = rx.index_select(0, tok)
        h = _gmm(xs, self.w_gate_up, offs, host, grouped)
        gate, up = h.chunk(2, dim=-1)
        o = _gmm(F.silu(gate) * up, self.w_down, offs, host, grouped)
        acc = _acc(rx.dtype)
        wsel = rw.reshape(-1).to(acc).index_select(0, pairs)
        y = self._weighted_sum(o.to(acc) * wsel.unsqueeze(1), pairs, N, K, rx.dtype)
        return y, dict(
            pairs=pairs,
            counts=counts,
            offs=offs,
            host=host,
            grouped=grouped,
            tok=tok,
            xs=xs,
            h=h,
            o=o,
            wsel=wsel,
            N=N,
            K=K,
            w_dtype=rw.dtype,
        )

    def _experts_backward(self, st: dict, g: torch.Tensor):
        """Gradients of :meth:`_experts_forward` for the rows and their weights, given ``g`` (``[N, H]``);
        returns ``(grad rows, grad weights, weight-gradient parts)``: the parts (per-row tensors grouped by
        expert) let the caller form the experts' weight gradients once for every chunk together."""
        pairs, offs, host, grouped, tok = st["pairs"], st["offs"], st["host"], st["grouped"], st["tok"]
        N, K, xs, h, o, wsel = st["N"], st["K"], st["xs"], st["h"], st["o"], st["wsel"]
        acc = wsel.dtype
        gt = g.to(acc).index_select(0, tok)  # [P, H]
        d_o = (gt * wsel.unsqueeze(1)).to(o.dtype)
        d_w = (gt * o.to(acc)).sum(dim=1)  # [P]
        grad_w = torch.zeros(N * K, dtype=acc, device=g.device).index_copy(0, pairs, d_w).view(N, K)
        gate, up = (t.to(acc) for t in h.chunk(2, dim=-1))  # the activation's gradient in float32
        d_a = _gmm(d_o, self.w_down.transpose(1, 2), offs, host, grouped).to(acc)  # [P, F]
        sg = F.silu(gate)
        dh = torch.cat([d_a * up * _silu_grad(gate), d_a * sg], dim=1).to(h.dtype)  # one rounding
        d_xs = _gmm(dh, self.w_gate_up.transpose(1, 2), offs, host, grouped)  # [P, H]
        grad_x = self._weighted_sum(d_xs, pairs, N, K, xs.dtype)
        if not st.get("weight_grads", True):
            return grad_x, grad_w.to(st["w_dtype"]), None
        a = (sg * up).to(h.dtype)
        return (
            grad_x,
            grad_w.to(st["w_dtype"]),
            dict(d_o=d_o, a=a, dh=dh, xs=xs, counts=st["counts"], offs=offs, host=host, grouped=grouped),
        )

    def _expert_weight_grads(self, parts: List[dict]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(grad w_gate_up, grad w_down)`` from every chunk's weight-gradient parts at once: the chunks'
        rows are regrouped by expert (one gather per tensor) and each gradient is one grouped GEMM, instead
        of a full-size gradient per chunk and their sum."""
        L = self.num_local
        grouped = parts[0]["grouped"]
        if len(parts) == 1:
            q = parts[0]
            d_o, a, dh, xs, offs, host = q["d_o"], q["a"], q["dh"], q["xs"], q["offs"], q["host"]
        else:
            experts = torch.arange(L, device=parts[0]["xs"].device)
            key = torch.cat([torch.repeat_interleave(experts, q["counts"], output_size=q["xs"].size(0)) for q in parts])
            order = torch.sort(key, stable=True).indices
            d_o, a, dh, xs = (torch.cat([q[n] for q in parts]).index_select(0, order) for n in ("d_o", "a", "dh", "xs"))
            counts = sum(q["counts"] for q in parts)
            offs = torch.cumsum(counts, 0).to(torch.int32)
            host = None if grouped else counts.tolist()
        g_down = _gmm_weight_grad(d_o, a, offs, host, grouped, L)  # [L, H, F]
        g_gate_up = _gmm_weight_grad(dh, xs, offs, host, grouped, L)  # [L, 2F, H]
        return g_gate_up, g_down

    def shared(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The shared experts' output (``None`` without them)."""
        if self.shared_gate_up is None:
            return None
        return _swiglu(x, self.shared_gate_up, self.shared_down)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on this rank's tokens ``x`` ``[T, hidden]`` (``T`` may differ between ranks, 0 too):
        route, dispatch, local experts, combine, plus the shared experts; the same shape back. Every rank
        of the group must call it (the dispatch and combine are collective). With ``record_stats`` the
        time split lands in :attr:`stats` (and, after ``backward``, in :attr:`backward_stats`)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.size(1) != self.hidden:
            # the other ranks are in this forward's dispatch: fail it everywhere instead of leaving them there
            self.buffer.abort_dispatch(
                DeepEPInputError(
                    f"ExpertParallelMoE expects [tokens, {self.hidden}], got {list(getattr(x, 'shape', []))}"
                )
            )
        cuda = x.is_cuda
        timer = _Timer(self.record_stats, cuda, self.buffer.get_comm_stream() if cuda else None)
        timer.start()
        with timer.span("compute"):
            idx, w = self.route(x)
        # dispatch -> experts -> combine, one autograd node, forward and backward (chunked when num_chunks > 1);
        # the chunks' layouts before the event the first dispatch waits for (the dispatch reads them)
        with timer.span("compute"):
            chunks = chunk_layouts(self, idx, self.num_chunks)
        if self.num_chunks > 1:
            first = _record() if cuda else None  # x and the routing are ready: dispatch may start
            with timer.span("compute"):
                shared = self.shared(x)  # while the first dispatch is in flight
        else:  # no overlap: the shared experts first
            with timer.span("compute"):
                shared = self.shared(x)
            first = _record() if cuda else None
        y = _Pipeline.apply(self, timer, chunks, first, x, w, self.w_gate_up, self.w_down)
        if shared is not None:
            with timer.span("compute"):
                y = y + shared
        self.stats = timer.finish()
        return y

    # ------------------------------------------------------------------ decoding (low-latency mode)
    def experts_low_latency(self, recv_x, recv_count: torch.Tensor) -> torch.Tensor:
        """The local experts on a low-latency dispatch's output: ``recv_x`` bf16 ``[L, R*M, H]`` or DeepEP's
        fp8 pair ``(float8 [L, R*M, H], float32 scales [L, R*M, H/128])``, the first ``recv_count[l]`` rows
        of expert ``l`` valid, from a dispatch with this layer's ``top_k`` (distinct experts per token).
        Returns bf16 ``[L, R*M, H]`` (rows past the counts are zero). On Hopper GPUs
        the valid rows are packed without a host sync into one grouped GEMM per projection (capturable in
        a CUDA graph); elsewhere a loop over experts reads the counts on the host."""
        if isinstance(recv_x, tuple):
            vals, scales = recv_x
            if scales.dtype != torch.float32:
                raise DeepEPInputError("experts_low_latency takes float32 scales (dispatch with use_ue8m0=False)")
            L, RM, H = vals.shape
            x = (vals.float().view(L, RM, -1, 128) * scales.unsqueeze(-1)).view(L, RM, H).to(torch.bfloat16)
        else:
            x = recv_x
        L, RM, H = x.shape
        if L != self.num_local or H != self.hidden:
            raise DeepEPInputError(
                f"experts_low_latency expects [{self.num_local}, R*M, {self.hidden}], got {list(x.shape)}"
            )
        if self.w_gate_up.dtype != torch.bfloat16:
            raise DeepEPInputError(
                f"experts_low_latency needs bfloat16 expert weights (the low-latency rows are "
                f"bf16), this layer has {self.w_gate_up.dtype}"
            )
        counts = recv_count.to(torch.int64)
        j = torch.arange(RM, device=x.device)
        valid = j.unsqueeze(0) < counts.unsqueeze(1)  # [L, RM]
        y = torch.zeros_like(x)
        if self._grouped(x) and L * RM:
            # the most rows a rank can receive from a dispatch with this layer's top-k (distinct experts per
            # token); rows past it (another top-k) are dropped rather than written out of bounds
            P = min(L, self.top_k) * RM
            ends = torch.cumsum(counts, 0)
            at = (ends - counts).unsqueeze(1) + j
            valid = valid & (at < P)
            dest = torch.where(valid, at, P).reshape(-1)  # packed row, P: none
            packed = x.new_zeros((P + 1, H)).index_copy_(0, dest, x.reshape(-1, H))[:P]
            offs = ends.clamp(max=P).to(torch.int32)
            h = torch._grouped_mm(packed, self.w_gate_up.transpose(1, 2), offs=offs)
            gate, up = h.chunk(2, dim=-1)
            out = torch._grouped_mm(F.silu(gate) * up, self.w_down.transpose(1, 2), offs=offs)
            rows = out.index_select(0, dest.clamp(max=max(P - 1, 0)))
            y = torch.where(valid.reshape(-1, 1), rows, 0).view(L, RM, H).to(x.dtype)
        else:
            for e, n in enumerate(counts.tolist()):
                if n:
                    y[e, :n] = _swiglu(x[e, :n], self.w_gate_up[e], self.w_down[e]).to(x.dtype)
        return y

    def decode(
        self,
        x: torch.Tensor,
        max_tokens_per_rank: int,
        *,
        micro_batches: int = 2,
        use_fp8: bool = True,
        round_scale: bool = False,
    ) -> torch.Tensor:
        """Inference forward through the low-latency kernels (DeepEP's decoding mode; no autograd).

        ``x`` bf16 ``[T, hidden]`` with ``T <= max_tokens_per_rank`` (the same value on every rank: it
        fixes the low-latency buffers' shapes). The tokens are split into ``micro_batches`` (1 or 2) and
        overlapped with the receive hooks as in DeepEP's two-micro-batch decoding: every micro-batch's
        dispatch is sent, the shared experts run while the rows travel, then micro-batch ``i`` is received,
        its experts run and its combine is sent while micro-batch ``i+1`` is still arriving; the combines
        are received last. ``use_fp8`` casts the dispatched rows to fp8 in the send (DeepEP's format),
        combine is bf16. On the nvlink transport no step waits for the host where the experts take the
        grouped GEMM (Hopper, bf16), so the call can be captured in a CUDA graph. Result bf16 ``[T, hidden]``.
        """
        if x.dim() != 2 or x.size(1) != self.hidden or x.dtype != torch.bfloat16:
            raise DeepEPInputError(f"decode expects bfloat16 [tokens, {self.hidden}], got {x.dtype} {list(x.shape)}")
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            raise DeepEPInputError(
                "decode is inference only (the low-latency kernels have no backward): call it "
                "under torch.no_grad() or torch.inference_mode()"
            )
        if micro_batches not in (1, 2):
            raise DeepEPInputError(
                f"micro_batches must be 1 or 2 (a Buffer holds two pending receive hooks), got {micro_batches}"
            )
        T = x.size(0)
        if not isinstance(max_tokens_per_rank, int) or max_tokens_per_rank < max(T, 1):
            raise DeepEPInputError(f"max_tokens_per_rank={max_tokens_per_rank!r} must be an int >= the {T} tokens")
        M = -(-max_tokens_per_rank // micro_batches)  # tokens per micro-batch, the same on every rank
        cuda = x.is_cuda
        timer = _Timer(self.record_stats, cuda, None)
        timer.start()
        bounds = [T * i // micro_batches for i in range(micro_batches + 1)]
        parts = [x[bounds[i] : bounds[i + 1]] for i in range(micro_batches)]
        buf = self.buffer
        with timer.span("compute"):
            routes = [self.route(p) for p in parts]
        sent = []
        with timer.span("comm"):
            for p, (idx, _) in zip(parts, routes):  # every dispatch sends; nothing received yet
                rx, cnt, handle, _, hook = buf.low_latency_dispatch(
                    p, idx, M, self.num_experts, use_fp8=use_fp8, round_scale=round_scale, return_recv_hook=True
                )
                sent.append((rx, cnt, handle, hook))
        with timer.span("compute"):
            shared = self.shared(x)  # while the rows travel
        combines = []
        for (rx, cnt, handle, hook), (idx, w) in zip(sent, routes):
            with timer.span("comm"):
                hook()  # this micro-batch's rows arrive
            with timer.span("compute"):
                y = self.experts_low_latency(rx, cnt)
            with timer.span("comm"):
                out, _, chook = buf.low_latency_combine(y, idx, w, handle, return_recv_hook=True)
            combines.append((out, chook))
        outs = []
        for out, chook in combines:
            with timer.span("comm"):
                chook()
            outs.append(out)
        with timer.span("compute"):
            y = torch.cat(outs) if len(outs) > 1 else outs[0]
            if shared is not None:
                y = y + shared.to(y.dtype)
        self.stats = timer.finish()
        return y
