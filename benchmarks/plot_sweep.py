"""Plot GB/s against tokens per rank from ``deep-ep bench --sweep --json`` result files.

    python benchmarks/plot_sweep.py RESULT.json [MORE.json ...] -o sweep.png [--gbps link|logical]

One line per (backend, op, timing) over every file given; the card and rank count go in the title.
Needs matplotlib (``pip install matplotlib``); not a dependency of deep_ep.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def series(results: list, gbps: str) -> dict:
    """``{(backend, op, timing, wire): [(tokens, GB/s), ...]}`` sorted by tokens, rows without a figure left out."""
    out = defaultdict(list)
    key = f"gbps_{gbps}"
    for res in results:
        for row in res["rows"]:
            value = row.get(key)
            if value is None:
                continue
            out[(row["backend"], row["op"], row.get("timing", "cached"), row.get("wire", "bf16"))].append(
                (row["tokens"], value))
    return {k: sorted(v) for k, v in out.items()}


def main(argv=None) -> int:
    """Command-line entry: read the files, draw, write the PNG."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="result JSON files (BENCH.md format)")
    p.add_argument("-o", "--output", required=True, help="PNG to write")
    p.add_argument("--gbps", choices=("link", "logical"), default="link",
                   help="bytes that crossed to another GPU (default) or bytes of recv_x, per second")
    p.add_argument("--timing", default="cached", help="which dispatch timing to draw (cached or fresh)")
    args = p.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_sweep.py needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    results = []
    for path in args.results:
        with open(path) as f:
            results.append(json.load(f))
    data = series(results, args.gbps)
    fig, ax = plt.subplots(figsize=(8, 5))
    for (backend, op, timing, wire), pts in sorted(data.items()):
        if timing != args.timing or len(pts) < 2:
            continue
        xs, ys = zip(*pts)
        style = "-" if op == "dispatch" else "--"
        ax.plot(xs, ys, style, marker="o", label=f"{backend} {op} ({wire})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel(f"GB/s ({args.gbps})")
    first = results[0]
    ax.set_title(f"deep_ep {first.get('workload', '')}: {first.get('num_ranks')} x {first.get('card')}, "
                 f"{args.timing} timing, {first.get('date', '')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
