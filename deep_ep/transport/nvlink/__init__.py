"""The ``nvlink`` transport: torch symmetric memory on one host, rows moved over NVLink with no NCCL call.

- :mod:`.transport`: :class:`NVLinkTransport` (the host path: counts read on the host, rows moved by the
  copy engines);
- :mod:`.schedule`: what a host-path call does, from the counts matrix alone (windows, rounds, chunks);
- :mod:`.device_path`: ``num_worst_tokens`` calls whose layout lives on the device (Triton stores);
- :mod:`.low_latency`: DeepEP's low-latency calls (one send kernel, a barrier, one receive kernel).

Its Triton kernels are in :mod:`deep_ep.kernels` (``scatter``, ``plan``, ``low_latency``, ``reduce``).
"""

from __future__ import annotations

from .transport import DEFAULT_STAGING_BYTES, NVLinkTransport

__all__ = ["NVLinkTransport", "DEFAULT_STAGING_BYTES"]
