"""``deep_ep.utils.event.EventOverlap``: the event type :class:`deep_ep.ElasticBuffer` returns (V2's module path)."""

from __future__ import annotations

from ..elastic.events import ElasticEventOverlap as EventOverlap

__all__ = ["EventOverlap"]
