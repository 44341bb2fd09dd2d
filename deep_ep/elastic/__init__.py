"""DeepEP V2's ``ElasticBuffer`` API on deep_ep's transports (docs/api.md, ElasticBuffer; docs/elastic.md).

``ElasticBuffer`` and ``EPHandle`` are also exported as ``deep_ep.ElasticBuffer`` and ``deep_ep.EPHandle``.
"""

from __future__ import annotations

from .buffer import ElasticBuffer
from .events import ElasticEventOverlap
from .handle import EPHandle

__all__ = ["ElasticBuffer", "EPHandle", "ElasticEventOverlap"]
