"""Bounded caches of what a call computes once per shape or signature (statics, prepared launches, parsed
requests): one rule for all of them, so a workload whose shapes keep changing cannot grow them without end."""

from __future__ import annotations

from typing import Any, Dict

__all__ = ["LIMIT", "keep"]

#: entries a cache holds before it is cleared
LIMIT = 256


def keep(cache: Dict[Any, Any], key: Any, value: Any, limit: int = LIMIT) -> Any:
    """Store ``value`` under ``key``, clearing ``cache`` first when it holds ``limit`` entries.

    Args:
        cache: the dict; key: its key; value: what to keep; limit: entries at most.

    Returns:
        ``value``.
    """
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value
    return value
