"""The MoE layer over a Buffer: :class:`ExpertParallelMoE` (route -> dispatch -> experts -> combine), its
chunked pipeline that overlaps communication with expert compute (:mod:`.pipeline`), and the routing,
grouped-GEMM SwiGLU experts and dense reference it is tested against (:mod:`.experts`)."""

from __future__ import annotations

from .experts import dense_moe_reference, route_tokens
from .layer import ExpertParallelMoE, MoEStats

__all__ = ["ExpertParallelMoE", "MoEStats", "route_tokens", "dense_moe_reference"]
