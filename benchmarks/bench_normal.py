"""docs/bench.md normal-mode benchmark: ``python benchmarks/bench_normal.py [deep-ep bench options]``.

A thin wrapper: the benchmark lives in :mod:`deep_ep.bench` so that an installed
``deep-ep bench`` runs the same code. ``--help`` lists the options.
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from deep_ep.bench import main

    sys.exit(main(prog="python benchmarks/bench_normal.py"))
