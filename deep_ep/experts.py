"""Routing, grouped-GEMM SwiGLU experts and the dense reference of the MoE layer; they live in
:mod:`deep_ep.moe.experts` (this module keeps the documented name ``deep_ep.experts``)."""

from __future__ import annotations

from .moe.experts import *  # noqa: F403
from .moe.experts import __all__  # noqa: F401
