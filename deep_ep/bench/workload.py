"""Inputs of one benchmark case: routing, activations, and the bytes that must move.

Routing follows docs/bench.md: each token picks ``topk`` distinct experts, the top-k
of uniform random scores, or (``zipf<s>``) sampled without replacement with
probability proportional to ``1 / i**s`` over experts in a fixed random order
shared by all ranks (so the hot experts are spread over ranks, not all on rank
0). The traffic counts are computed here with plain torch, independently of
the library under test, so the baselines need nothing from it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist

FP8_BLOCK = 128


def row_bytes(wire: str, hidden: int) -> int:
    """Bytes of one dispatched row on the wire: bf16 2H; fp8 H + 4H/128 (e4m3 + fp32 scales).

    Args:
        wire: ``'bf16'`` or ``'fp8'``.
        hidden: ``H``.

    Returns:
        The bytes.
    """
    if wire == "bf16":
        return 2 * hidden
    if wire == "fp8":
        return hidden + 4 * (hidden // FP8_BLOCK)
    raise ValueError(f"unknown wire format {wire!r}")


@dataclasses.dataclass
class Workload:
    """One rank's inputs for one token count, and the row counts they imply.

    ``send_counts[j]``: rows this rank sends to rank j (a token once per rank).
    ``recv_counts[i]``: rows this rank receives from rank i (all-to-all of the above).
    """

    tokens: int
    hidden: int
    topk_idx: torch.Tensor  # int64 [T, K]
    topk_weights: torch.Tensor  # float32 [T, K]
    x: torch.Tensor  # bf16 [T, H]
    x_fp8: Optional[tuple]  # (float8_e4m3fn [T, H], float32 [T, H/128]) or None
    send_counts: list
    recv_counts: list

    def dispatch_input(self, wire: str):
        """``x`` in the form ``Buffer.dispatch`` takes for ``wire``.

        Args:
            wire: ``'bf16'`` or ``'fp8'``.

        Returns:
            The bf16 tensor, or the fp8 pair.
        """
        return self.x if wire == "bf16" else self.x_fp8

    def remote_recv_rows(self, rank: int) -> int:
        """Rows this rank receives from other ranks.

        Args:
            rank: this rank.

        Returns:
            The row count.
        """
        return sum(self.recv_counts) - self.recv_counts[rank]


def make_routing(tokens: int, experts: int, topk: int, routing: str, seed: int, rank: int) -> tuple:
    """The routing of one rank: distinct experts per token (docs/bench.md).

    Args:
        tokens: ``T``.
        experts: ``E``.
        topk: ``K``.
        routing: ``'uniform'`` or ``'zipf<s>'``.
        seed: the run's seed.
        rank: this rank (its own stream of the seed).

    Returns:
        ``(topk_idx int64 [T, K], topk_weights float32 [T, K])`` on CPU.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    if routing == "uniform":
        scores = torch.rand(tokens, experts, generator=gen)
        vals, idx = scores.topk(topk, dim=1)
    elif routing.startswith("zipf"):
        s = float(routing[4:])
        order = torch.randperm(experts, generator=torch.Generator().manual_seed(seed))
        p = torch.empty(experts, dtype=torch.float64)
        p[order] = torch.arange(1, experts + 1, dtype=torch.float64).pow(-s)
        idx = torch.multinomial(p.expand(tokens, experts), topk, replacement=False, generator=gen)
        vals = torch.rand(tokens, topk, generator=gen)
    else:
        raise ValueError(f"unknown routing {routing!r}")
    return idx.to(torch.int64), torch.softmax(vals.float(), dim=1)


def quantize_fp8(x: torch.Tensor) -> tuple:
    """Per-128-column e4m3 quantisation (DeepEP's fp8 input format).

    Args:
        x: ``[T, H]``, ``H`` a multiple of 128.

    Returns:
        ``(q float8_e4m3fn [T, H], scales float32 [T, H/128])``.
    """
    t, h = x.shape
    blocks = x.float().view(t, h // FP8_BLOCK, FP8_BLOCK)
    scales = blocks.abs().amax(dim=-1).clamp(min=1e-4) / 448.0
    q = (blocks / scales.unsqueeze(-1)).to(torch.float8_e4m3fn).view(t, h)
    return q, scales.contiguous()


def send_counts_of(topk_idx: torch.Tensor, experts: int, world: int) -> torch.Tensor:
    """Tokens whose top-k names at least one expert of each rank.

    Args:
        topk_idx: ``[T, K]`` (-1 = none).
        experts: ``E``.
        world: ``R``.

    Returns:
        int64 ``[R]``.
    """
    per_rank = experts // world
    owner = torch.where(topk_idx >= 0, topk_idx // per_rank, world)  # [T, K]; world = none
    hit = torch.zeros(topk_idx.shape[0], world + 1, dtype=torch.bool)
    hit.scatter_(1, owner.cpu(), True)
    return hit[:, :world].sum(dim=0)


def make_workload(cfg, tokens: int, rank: int, device: torch.device, group) -> Workload:
    """Build this rank's inputs for ``tokens`` and exchange the per-rank counts (collective).

    Args:
        cfg: the run.
        tokens: tokens per rank.
        rank: this rank.
        device: its device.
        group: the data process group.

    Returns:
        The :class:`Workload`.
    """
    idx, w = make_routing(tokens, cfg.experts, cfg.topk, cfg.routing, cfg.seed, rank)
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + rank)
    x = torch.randn(tokens, cfg.hidden, generator=gen, device=device, dtype=torch.float32).to(torch.bfloat16)
    x_fp8 = quantize_fp8(x) if "fp8" in cfg.wires else None
    send = send_counts_of(idx, cfg.experts, cfg.world_size)
    recv = torch.empty_like(send)
    if cfg.dist_backend == "nccl":
        send_d, recv_d = send.to(device), recv.to(device)
        dist.all_to_all_single(recv_d, send_d, group=group)
        recv = recv_d.cpu()
    else:
        dist.all_to_all_single(recv, send, group=group)
    return Workload(
        tokens=tokens,
        hidden=cfg.hidden,
        topk_idx=idx.to(device),
        topk_weights=w.to(device),
        x=x,
        x_fp8=x_fp8,
        send_counts=send.tolist(),
        recv_counts=recv.tolist(),
    )
