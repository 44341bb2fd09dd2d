"""Hypothesis fuzzing of routing: empty ranks, one expert, all -1, K = 1..9, T = 0..300, R = 1..4, on the
collective and the hierarchical (emulated nodes) transports."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_conformance import run_scenario


@st.composite
def routing_cases(draw):
    R = draw(st.integers(1, 4))
    L = draw(st.integers(1, 4))
    K = draw(st.integers(1, 9))
    tokens = draw(st.lists(st.integers(0, 300), min_size=R, max_size=R))
    pattern = draw(st.sampled_from(["random", "random", "one_expert", "all_neg", "empty_rank", "repeat", "all_ranks"]))
    if pattern == "empty_rank" and R * L < 2:
        pattern = "random"
    sc = dict(
        tokens=tokens,
        topk=K,
        num_experts=R * L,
        pattern=pattern,
        hidden=draw(st.sampled_from([1, 8, 33, 128])),
        worst=draw(st.booleans()),
        weights=draw(st.booleans()),
        expert_alignment=draw(st.sampled_from([1, 2, 16])),
        nbias=draw(st.integers(0, 2)),
    )
    backend = draw(st.sampled_from(["collective", "collective", "hierarchical"]))
    return R, draw(st.integers(0, 2**31 - 1)), sc, backend


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=False
)
@given(case=routing_cases())
def test_fuzz_routing(rank_pool, case):
    R, seed, sc, backend = case
    rank_pool(R).run(run_scenario, backend, seed, sc, timeout=120)
