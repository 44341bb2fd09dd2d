"""Plot GB/s against tokens per rank from ``deep-ep bench --sweep --json`` result files.

    python benchmarks/plot_sweep.py RESULT.json [MORE.json ...] -o sweep.png [--gbps link|logical]

One line per (backend, op, wire, SM count) of one timing over every file given; the card and rank count go in
the title (:func:`deep_ep.bench.plot.write_png`; ``deep-ep bench --png`` draws the same for one run).
Needs matplotlib (``pip install matplotlib``); not a dependency of deep_ep.
"""

from __future__ import annotations

import argparse
import json
import sys

from deep_ep.bench.plot import series, write_png

__all__ = ["series", "main"]


def main(argv=None) -> int:
    """Command-line entry: read the files, draw, write the PNG."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="result JSON files (docs/bench.md format)")
    p.add_argument("-o", "--output", required=True, help="PNG to write")
    p.add_argument(
        "--gbps",
        choices=("link", "logical"),
        default="link",
        help="bytes that crossed to another GPU (default) or bytes of recv_x, per second",
    )
    p.add_argument("--timing", default="cached", help="which dispatch timing to draw (cached or fresh)")
    args = p.parse_args(argv)
    results = []
    for path in args.results:
        with open(path) as f:
            results.append(json.load(f))
    if write_png(results, args.output, args.gbps, args.timing) is None:
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
