"""Shared test inputs and worker-side helpers.

Every rank generates the inputs of *all* ranks from one seed, so each rank
can run the single-process oracle (:mod:`deep_ep.reference`) for itself and
compare with what the real collective returned, with no extra communication.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist

import deep_ep

try:  # the pool module defines the per-worker cache
    from tests._pool import WORKER_CACHE
except Exception:  # pragma: no cover
    WORKER_CACHE: dict = {}


def device() -> torch.device:
    """The device this worker's group works on (its CUDA device on an NCCL or gloo-on-CUDA group, else CPU)."""
    if dist.is_initialized():
        return deep_ep.transport.group_device()
    return torch.device("cpu")


def get_buffer(backend: str = "collective", **kwargs) -> deep_ep.Buffer:
    """A Buffer on the default group, cached per worker (creation is collective, so all ranks call this alike)."""
    key = ("buffer", backend, tuple(sorted(kwargs.items())))
    buf = WORKER_CACHE.get(key)
    if buf is None or buf._destroyed or buf._waiter.broken:
        import os

        env = {}
        if backend.startswith("nvlink") and device().type == "cpu":  # the shared-memory emulation (for tests)
            env["DEEP_EP_NVLINK_EMULATE"] = "1"
        if backend == "nvlink-fused":  # the fused path (its kernels interpreted on CPU)
            env.update(DEEP_EP_NVLINK_PATH="fused", DEEP_EP_KERNELS_ON_CPU="1")
        if backend == "nvlink-host":
            env["DEEP_EP_NVLINK_PATH"] = "host"
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            buf = deep_ep.Buffer(dist.group.WORLD, backend=backend.split("-")[0], **kwargs)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        WORKER_CACHE[key] = buf
    return buf


@dataclass
class Case:
    """Inputs of every rank for one dispatch/combine test."""

    num_ranks: int
    num_experts: int
    hidden: int
    topk: int
    tokens: List[int]
    xs: List[torch.Tensor]
    topk_idx: List[torch.Tensor]
    topk_weights: List[torch.Tensor]
    fp8: Optional[List[tuple]] = None
    extra: dict = field(default_factory=dict)


def make_case(
    seed: int,
    num_ranks: int,
    *,
    num_experts: int = 8,
    hidden: int = 64,
    topk: int = 3,
    tokens=None,
    pattern: str = "random",
    dtype=torch.bfloat16,
    neg_frac: float = 0.1,
    fp8: bool = False,
    rank_valued: bool = False,
) -> Case:
    """Random routing for ``num_ranks`` ranks.

    ``pattern``: ``random`` (top-k of random scores, no repeats, some -1),
    ``one_expert`` (every token to expert 0 only), ``all_neg`` (all -1),
    ``empty_rank`` (rank 0's experts never chosen), ``repeat`` (random ids,
    repeats allowed), ``all_ranks`` (each token to experts on every rank).
    ``rank_valued``: x rows hold the source rank (DeepEP's own test style).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    if tokens is None:
        tokens = [int(torch.randint(0, 24, (1,), generator=g, device="cpu")) for _ in range(num_ranks)]
    L = num_experts // num_ranks
    xs, idx, ws = [], [], []
    for r in range(num_ranks):
        T = tokens[r]
        if rank_valued:
            x = (
                torch.full((T, hidden), float(r), dtype=torch.float32, device="cpu")
                + torch.arange(T, dtype=torch.float32, device="cpu").unsqueeze(1) / 1024.0
            )
        else:
            x = torch.randn((T, hidden), generator=g, dtype=torch.float32, device="cpu")
        xs.append(x.to(dtype))
        k = min(topk, num_experts)
        if pattern == "one_expert":
            ti = torch.full((T, topk), -1, dtype=torch.int64, device="cpu")
            if topk:
                ti[:, 0] = 0
        elif pattern == "all_neg":
            ti = torch.full((T, topk), -1, dtype=torch.int64, device="cpu")
        elif pattern == "repeat":
            ti = torch.randint(-1, num_experts, (T, topk), generator=g, dtype=torch.int64, device="cpu")
        elif pattern == "empty_rank":
            lo = min(L, num_experts - 1)
            scores = torch.rand((T, num_experts), generator=g, device="cpu")
            scores[:, :L] = -1.0
            ti = (
                scores.topk(min(k, num_experts - lo), dim=1).indices
                if T
                else torch.zeros((0, min(k, num_experts - lo)), dtype=torch.int64, device="cpu")
            )
            if ti.size(1) < topk:
                ti = torch.cat([ti, torch.full((T, topk - ti.size(1)), -1, dtype=torch.int64, device="cpu")], dim=1)
        elif pattern == "all_ranks":
            ti = torch.stack(
                [torch.full((T,), j * L, dtype=torch.int64, device="cpu") for j in range(num_ranks)], dim=1
            )
        else:
            scores = torch.rand((T, num_experts), generator=g, device="cpu")
            ti = scores.topk(k, dim=1).indices if T else torch.zeros((0, k), dtype=torch.int64, device="cpu")
            if k < topk:
                ti = torch.cat([ti, torch.full((T, topk - k), -1, dtype=torch.int64, device="cpu")], dim=1)
            if neg_frac > 0 and T:
                ti[torch.rand((T, topk), generator=g, device="cpu") < neg_frac] = -1
        idx.append(ti.contiguous())
        ws.append(torch.rand((ti.size(0), ti.size(1)), generator=g, dtype=torch.float32, device="cpu"))
    case = Case(num_ranks, num_experts, hidden, topk, list(tokens), xs, idx, ws)
    if fp8:
        case.fp8 = []
        for x in xs:
            xf = x.float().view(x.size(0), hidden // 128, 128)
            amax = xf.abs().amax(dim=2).clamp(min=1e-4)
            scale = amax / 448.0
            q = (xf / scale.unsqueeze(2)).to(torch.float8_e4m3fn).view(x.size(0), hidden)
            case.fp8.append((q, scale.contiguous()))
    return case


def to(t, dev):
    """Move a tensor or a tuple of tensors to ``dev``."""
    if t is None:
        return None
    if isinstance(t, tuple):
        return tuple(a.to(dev) for a in t)
    return t.to(dev)


def assert_same(actual, expected, what: str, atol: float = 0.0, rtol: float = 0.0) -> None:
    """Exact (default) or tolerance comparison of tensors / fp8 pairs, NaN-aware, on the CPU."""
    if isinstance(expected, tuple):
        assert isinstance(actual, tuple), f"{what}: expected a tuple"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{what}[{i}]", atol, rtol)
        return
    assert actual is not None, f"{what}: got None"
    a, e = actual.detach().cpu(), expected.detach().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    assert a.dtype == e.dtype, f"{what}: dtype {a.dtype} != expected {e.dtype}"
    if a.dtype in (torch.float8_e4m3fn,):
        a, e = a.view(torch.uint8), e.view(torch.uint8)
    if atol == 0 and rtol == 0 and not a.dtype.is_floating_point:
        assert torch.equal(a, e), f"{what}: differs at {torch.nonzero(a != e)[:5].tolist()}"
    else:
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{what}: {m}")
