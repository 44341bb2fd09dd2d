"""deep_ep: expert-parallel communication for Mixture-of-Experts models.

The DeepEP v1 Python API (``Buffer``, ``Config``, ``EventOverlap``,
``topk_idx_t``) on torch.distributed, with a CPU path (gloo), autograd
wrappers (:mod:`deep_ep.ops`) and the seed's :class:`SparseCollective`.
See docs/api.md for the reference.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import layout, ops, reference
from .buffer import Buffer, DispatchHandle
from .config import Config, EventOverlap, topk_idx_t
from .errors import (
    BufferDestroyedError,
    DeepEPError,
    DeepEPInputError,
    DeepEPTimeoutError,
    DeepEPTypeError,
    PeerFailureError,
    RankMismatchError,
    RemoteInputError,
)
from .moe import ExpertParallelMoE
from .sparse import SparseCollective

__all__ = [
    "Buffer",
    "Config",
    "EventOverlap",
    "topk_idx_t",
    "SparseCollective",
    "ExpertParallelMoE",
    "DispatchHandle",
    "ops",
    "layout",
    "reference",
    "DeepEPError",
    "DeepEPInputError",
    "DeepEPTypeError",
    "DeepEPTimeoutError",
    "RankMismatchError",
    "RemoteInputError",
    "BufferDestroyedError",
    "PeerFailureError",
    "ElasticBuffer",
    "EPHandle",
    "utils",
    "__version__",
]


def __getattr__(name: str):
    """DeepEP V2's names (``ElasticBuffer``, ``EPHandle``, ``utils``; docs/api.md, ElasticBuffer) load on first use."""
    import importlib

    if name in ("ElasticBuffer", "EPHandle"):
        return getattr(importlib.import_module(".elastic", __name__), name)
    if name == "utils":
        return importlib.import_module(".utils", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
