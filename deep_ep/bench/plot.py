"""GB/s against tokens per rank, from ``deep-ep bench`` results (``deep-ep bench --png``,
``benchmarks/plot_sweep.py``). Needs matplotlib, which is not a dependency of deep_ep."""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from typing import Optional, Sequence

__all__ = ["series", "write_png"]


def series(results: Sequence[dict], gbps: str) -> dict:
    """The points of every line of a chart.

    Args:
        results: result objects (docs/bench.md format).
        gbps: ``'link'`` or ``'logical'``.

    Returns:
        ``{(backend, op, timing, wire, num_sms): [(tokens, GB/s), ...]}`` sorted by tokens, rows without
        a figure left out.
    """
    out = defaultdict(list)
    key = f"gbps_{gbps}"
    for res in results:
        for row in res["rows"]:
            value = row.get(key)
            if value is None:
                continue
            out[
                (row["backend"], row["op"], row.get("timing", "cached"), row.get("wire", "bf16"), row.get("num_sms"))
            ].append((row["tokens"], value))
    return {k: sorted(v) for k, v in out.items()}


def write_png(results: Sequence[dict], path: str, gbps: str = "link", timing: str = "cached") -> Optional[str]:
    """Draw one line per (backend, op, wire, SM count) of ``timing`` over every result.

    Args:
        results: result objects.
        path: the PNG to write.
        gbps: ``'link'`` or ``'logical'``.
        timing: which timing to draw (``'cached'``, ``'fresh'``, ...).

    Returns:
        ``path``, or ``None`` (and a message) when matplotlib is missing.
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: the process's backend stays as it is
    except ImportError:
        print("deep_ep: drawing a chart needs matplotlib (pip install matplotlib); no PNG written", file=sys.stderr)
        return None
    data = series(results, gbps)
    sweep = len({k[4] for k in data} - {None}) > 1
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for (backend, op, tm, wire, sms), pts in sorted(data.items(), key=lambda kv: str(kv[0])):
        if tm != timing:
            continue
        xs, ys = zip(*pts)
        label = f"{backend} {op} ({wire})" + (f" {sms} SMs" if sweep and sms is not None else "")
        ax.plot(xs, ys, "-" if op == "dispatch" else "--", marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel(f"GB/s ({gbps})")
    first = results[0]
    ax.set_title(
        f"deep_ep {first.get('workload', '')}: {first.get('num_ranks')} x {first.get('card')}, "
        f"{timing} timing, {first.get('date', '')}"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
