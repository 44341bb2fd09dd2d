"""Soak: many random-shape calls (dispatch, cached dispatch, combine: every output checked against the
reference) across transports on CPU ranks, with the process's memory sampled: no growth after warm-up.

The default run is a bounded form (a few dozen calls per transport); the full form (thousands of calls)
is marked slow.
"""

from __future__ import annotations

import gc
import random

import pytest
import torch

from tests.test_conformance import run_scenario


def _rss_bytes() -> int:
    """This process's resident memory (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:  # pragma: no cover - not Linux
        return 0


def _random_scenario(rng: random.Random, R: int) -> dict:
    """A random call shape with the features the conformance suite varies."""
    sc = dict(
        hidden=rng.choice([7, 16, 64, 130, 256]),
        topk=rng.randint(1, 4),
        num_experts=R * rng.choice([1, 2, 4]),
        tokens=[rng.choice([0, 1, 5, 17, 40]) for _ in range(R)],
        pattern=rng.choice(["random", "random", "random", "one_expert", "all_neg", "empty_rank", "repeat"]),
        dtype=rng.choice([torch.bfloat16, torch.bfloat16, torch.float32]),
        nbias=rng.randint(0, 2),
        weights=rng.random() < 0.8,
        expert_alignment=rng.choice([1, 1, 4]),
    )
    if rng.random() < 0.2:
        sc["worst"] = True
    if rng.random() < 0.15 and sc["pattern"] == "random":
        sc.update(fp8=True, hidden=256, dtype=torch.bfloat16)
    if sc["pattern"] == "one_expert":
        sc["topk"] = max(sc["topk"], 2)
    sc["topk"] = min(sc["topk"], sc["num_experts"])
    return sc


def rank_soak(rank, R, backend, calls, seed):
    rng = random.Random(seed)  # the same sequence on every rank
    samples = []
    for i in range(calls):
        sc = _random_scenario(rng, R)
        run_scenario(rank, R, backend, seed * 100003 + i, sc)
        if i == calls // 4 or i == calls - 1:  # after warm-up, and at the end
            gc.collect()
            samples.append(_rss_bytes())
    return samples


def _check_memory(samples, limit):
    for s in samples:
        warm, end = s
        assert end - warm <= limit, f"memory grew by {(end - warm) / 2**20:.1f} MiB over the soak ({s})"


@pytest.mark.parametrize("backend", ["collective", "hierarchical"])
def test_soak_bounded(rank_pool, backend):
    samples = rank_pool(2).run(rank_soak, backend, 100, 7 if backend == "collective" else 8)
    _check_memory(samples, 48 << 20)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["collective", "hierarchical"])
def test_soak_full(rank_pool, backend):
    samples = rank_pool(2).run(rank_soak, backend, 1500, 17 if backend == "collective" else 18, timeout=1800)
    _check_memory(samples, 48 << 20)
