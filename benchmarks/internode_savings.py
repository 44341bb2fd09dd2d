"""Inter-node rows of a dispatch, flat all-to-all against the hierarchical transport, from routing statistics.

python benchmarks/internode_savings.py [--tokens 65536] [--json FILE]

For top-8 of 256 experts on N nodes of 8 GPUs (experts spread evenly, rank r holding experts r*L..), a
token costs one row per destination *rank* on another node with a flat all-to-all, and one row per
destination *node* other than its own with the hierarchical transport (DeepEP's internode design). Routing:
top-8 of random scores, and group-limited routing with the experts grouped by node and at most 4 nodes per
token (DeepSeek-V3's node-limited routing). Counted by sampling tokens (the same routing code as the MoE
layer, ``deep_ep.moe.route_tokens``); no GPU needed.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deep_ep.moe import route_tokens  # noqa: E402


def rows_per_token(nodes: int, gpus: int, experts: int, topk: int, limited: bool, tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    H = 16
    x = torch.randn(tokens, H, generator=g)
    router = torch.randn(experts, H, generator=g)
    n_group = nodes if limited else 1
    topk_group = min(4, nodes) if limited else 1
    idx, _ = route_tokens(x, router, topk, n_group=n_group, topk_group=topk_group)
    R = nodes * gpus
    L = experts // R
    rank = idx // L                                                    # [T, k] destination rank
    src_node = torch.randint(0, nodes, (tokens,), generator=g)         # each token's own node
    in_rank = torch.zeros(tokens, R, dtype=torch.bool).scatter_(1, rank, True)
    in_node = in_rank.view(tokens, nodes, gpus).any(dim=2)
    other_rank = in_rank.view(tokens, nodes, gpus).sum(dim=2).scatter(1, src_node[:, None], 0).sum(dim=1)
    other_node = in_node.scatter(1, src_node[:, None], False).sum(dim=1)
    return float(other_rank.float().mean()), float(other_node.float().mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = []
    print("| nodes x GPUs | routing | flat rows/token | hierarchical rows/token | saved |")
    print("| --- | --- | ---: | ---: | ---: |")
    for nodes in (2, 4, 8):
        for limited in (False, True):
            flat, hier = rows_per_token(nodes, a.gpus_per_node, a.experts, a.topk, limited, a.tokens, a.seed)
            name = "group-limited (<= 4 nodes)" if limited else "top-8 of random scores"
            rows.append(dict(nodes=nodes, gpus_per_node=a.gpus_per_node, routing=name, flat_rows_per_token=flat,
                             hierarchical_rows_per_token=hier, saved=1 - hier / flat if flat else 0.0))
            print(f"| {nodes} x {a.gpus_per_node} | {name} | {flat:.2f} | {hier:.2f} | {100 * rows[-1]['saved']:.0f}% |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(workload="internode-savings", experts=a.experts, topk=a.topk, tokens=a.tokens,
                           command="python benchmarks/internode_savings.py", rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
