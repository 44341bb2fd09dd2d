"""The hierarchical transport's topology: rows across nodes equal the unique (token, node) pairs, a token
routed to every rank of a node crosses once, auto / topology_aware selection, bad node layouts."""
from __future__ import annotations

import pytest
import torch

import deep_ep
from deep_ep import reference as ref
from deep_ep.transport.hierarchical import ranks_per_node
from tests._cases import get_buffer, make_case


def rank_internode_rows(rank, R, pattern):
    P = 2
    case = make_case(3, R, num_experts=4 * R, hidden=32, topk=4, tokens=[20, 11, 7, 15][:R], pattern=pattern)
    E = case.num_experts
    buf = get_buffer("hierarchical", ranks_per_node=P)
    idx = case.topk_idx[rank]
    _, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    buf.dispatch(case.xs[rank], is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx)
    mask = ref.expert_rank_mask(idx, E, R)
    node_mask = mask.view(-1, R // P, P).any(dim=2)
    my_node = rank // P
    unique = int(node_mask.sum()) - int(node_mask[:, my_node].sum())          # (token, other node) pairs
    st = buf._transport.last_stats
    assert st["internode_rows"] == unique
    assert st["internode_bytes"] == unique * (2 * 32 + 8 * 4 + P)            # x bf16 + topk_idx int64 + target mask
    flat = int(mask.sum()) - int(mask[:, my_node * P:(my_node + 1) * P].sum())
    if pattern == "all_ranks":                                            # every rank of every node: P x fewer
        assert flat == P * unique
    assert unique <= flat


@pytest.mark.parametrize("pattern", ["random", "all_ranks"])
def test_internode_rows_are_unique_token_node_pairs(rank_pool, pattern):
    rank_pool(4).run(rank_internode_rows, pattern)


def rank_selection(rank, R):
    import torch.distributed as dist
    assert ranks_per_node(dist.group.WORLD) == R                       # one host: one node of every rank
    assert ranks_per_node(dist.group.WORLD, 2) == 2
    with pytest.raises(deep_ep.DeepEPInputError, match="must divide"):
        ranks_per_node(dist.group.WORLD, 3)
    assert deep_ep.Buffer(dist.group.WORLD).backend == "collective"   # one host, CPU: the flat path
    buf = deep_ep.Buffer(dist.group.WORLD, backend="hierarchical")
    assert buf._transport.P == R and buf._transport.N == 1
    from deep_ep import transport
    real = transport._one_host
    transport._one_host = lambda group: False                            # as if the ranks were on 2 hosts
    try:
        assert transport.select_backend(dist.group.WORLD)[0] == "hierarchical"
        name, why = transport.select_backend(dist.group.WORLD, topology_aware=False)
        assert name == "collective" and "topology_aware is off" in why
    finally:
        transport._one_host = real


def test_node_layout_and_selection(rank_pool):
    rank_pool(4).run(rank_selection)


def test_internode_savings_table():
    """benchmarks/internode_savings.py: with 2 nodes every token crosses once (hierarchical) and the flat
    all-to-all sends one row per remote rank; node-limited routing reaches at most 4 nodes."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "internode_savings.py")
    spec = importlib.util.spec_from_file_location("internode_savings", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    flat, hier = mod.rows_per_token(2, 8, 256, 8, False, 2048, 0)
    assert 0.99 < hier <= 1.0 and flat > 2.5
    flat8, hier8 = mod.rows_per_token(8, 8, 256, 8, True, 2048, 0)
    assert hier8 <= 4.0 and flat8 > hier8                           # at most 4 nodes per token
