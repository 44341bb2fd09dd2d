"""Inter-node rows of a dispatch, flat all-to-all against the hierarchical transport, from routing statistics.

python benchmarks/internode_savings.py [--tokens 65536] [--json FILE]

For top-8 of 256 experts on N = 2, 4, 8 nodes of 8 GPUs (experts spread evenly, rank r holding experts
r*L..(r+1)*L-1, so a node holds 256/N experts), a token costs one row per destination *rank* on another
node with a flat all-to-all, and one row per destination *node* other than its own with the hierarchical
transport (DeepEP's internode design). Two routings, both top-8 of i.i.d. Gaussian router logits (softmax):

- plain: top-8 of all 256 experts;
- group-limited, as DeepSeek-V3: the 256 experts form n_group=8 groups of 32 consecutive experts, each
  token keeps its topk_group=4 best groups and takes its top-8 experts inside them. The groups are fixed
  by the model, not by the node count: a node holds 4 groups (2 nodes), 2 groups (4 nodes) or 1 group
  (8 nodes), so a token reaches at most 4 groups, hence at most 4 nodes at 8 nodes.

Groups are ranked by their best score (``deep_ep.moe.route_tokens``, the MoE layer's routing code;
DeepSeek-V3 ranks them by the sum of their top-2 scores; with these logits that changes
every figure below by at most 0.01 row). Each token's own node is uniform. Counted by
sampling tokens; no GPU needed.
"""

import argparse
import json
import os
import shlex
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deep_ep.moe import route_tokens  # noqa: E402

N_GROUP, TOPK_GROUP = 8, 4  # DeepSeek-V3: 256 routed experts in 8 groups, top-4 groups per token


def route(
    experts: int,
    topk: int,
    limited: bool,
    tokens: int,
    g: torch.Generator,
    n_group: int = N_GROUP,
    topk_group: int = TOPK_GROUP,
) -> torch.Tensor:
    """``[tokens, topk]`` expert ids: top-k of i.i.d. logits, group-limited (``topk_group`` of ``n_group``)
    when ``limited``."""
    logits = torch.randn(tokens, experts, generator=g)
    eye = torch.eye(experts)  # router = identity: the logits as drawn
    if limited:
        idx, _ = route_tokens(logits, eye, topk, n_group=n_group, topk_group=topk_group)
    else:
        idx, _ = route_tokens(logits, eye, topk)
    return idx


def rows_per_token(
    nodes: int,
    gpus: int,
    experts: int,
    topk: int,
    limited: bool,
    tokens: int,
    seed: int,
    n_group: int = N_GROUP,
    topk_group: int = TOPK_GROUP,
):
    """Mean rows per token sent to other nodes: ``(flat all-to-all, hierarchical)``."""
    g = torch.Generator().manual_seed(seed)
    idx = route(experts, topk, limited, tokens, g, n_group, topk_group)
    R = nodes * gpus
    L = experts // R
    rank = idx // L  # [T, k] destination rank
    src_node = torch.randint(0, nodes, (tokens,), generator=g)  # each token's own node
    in_rank = torch.zeros(tokens, R, dtype=torch.bool).scatter_(1, rank, True)
    per_node = in_rank.view(tokens, nodes, gpus)
    other_rank = per_node.sum(dim=2).scatter(1, src_node[:, None], 0).sum(dim=1)
    other_node = per_node.any(dim=2).scatter(1, src_node[:, None], False).sum(dim=1)
    return float(other_rank.float().mean()), float(other_node.float().mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--n-group", type=int, default=N_GROUP)
    ap.add_argument("--topk-group", type=int, default=TOPK_GROUP)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = []
    limited_name = f"group-limited ({a.topk_group} of {a.n_group} groups)"
    print(
        f"top-{a.topk} of {a.experts} experts, {a.gpus_per_node} GPUs per node, {a.tokens} sampled tokens; "
        f"group-limited = DeepSeek-V3 routing: {a.n_group} groups of {a.experts // a.n_group} experts, "
        f"top-{a.topk_group} groups per token, then top-{a.topk} experts inside them\n"
    )
    print("| nodes x GPUs | routing | flat rows / token | hierarchical rows / token | saved |")
    print("| --- | --- | ---: | ---: | ---: |")
    for nodes in (2, 4, 8):
        for limited in (False, True):
            flat, hier = rows_per_token(
                nodes, a.gpus_per_node, a.experts, a.topk, limited, a.tokens, a.seed, a.n_group, a.topk_group
            )
            name = limited_name if limited else f"top-{a.topk} of {a.experts}"
            rows.append(
                dict(
                    nodes=nodes,
                    gpus_per_node=a.gpus_per_node,
                    routing=name,
                    flat_rows_per_token=flat,
                    hierarchical_rows_per_token=hier,
                    saved=1 - hier / flat if flat else 0.0,
                )
            )
            print(
                f"| {nodes} x {a.gpus_per_node} | {name} | {flat:.2f} | {hier:.2f} | {100 * rows[-1]['saved']:.0f}% |"
            )
    if a.json:
        cmd = shlex.join(["python"] + sys.argv)  # the command as run
        with open(a.json, "w") as f:
            json.dump(
                dict(
                    workload="internode-savings",
                    experts=a.experts,
                    topk=a.topk,
                    tokens=a.tokens,
                    n_group=a.n_group,
                    topk_group=a.topk_group,
                    seed=a.seed,
                    routing="i.i.d. Gaussian router logits, softmax; group-limited as DeepSeek-V3 "
                    f"({a.n_group} groups of {a.experts // a.n_group} experts, top-{a.topk_group} "
                    f"groups per token, groups ranked by their best score)",
                    command=cmd,
                    rows=rows,
                ),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
