"""Helpers DeepEP V2's test scripts import (``deep_ep.utils.envs``, ``.math``, ``.testing``, ``.refs``,
``.gate``, ``.event``), written for deep_ep so that those scripts run against it, on CPU ranks (gloo) too.

Not imported by ``import deep_ep``: ``deep_ep.utils`` loads on first use.
"""

from __future__ import annotations

from . import envs, event, gate, math, refs, testing

__all__ = ["envs", "event", "gate", "math", "refs", "testing"]
