"""From every rank's raw measurements to the docs/bench.md result object, its table and file.

Reduction over ranks (recorded in the result as ``reduce``): ``time_us`` is the
largest of the ranks' median times (a step waits for its slowest rank); the
bandwidths divide the mean bytes per rank by that time. ``ratio_vs[b]`` of a
row is baseline ``b``'s time over the row's time for the same op, wire and
tokens (> 1: faster than the baseline). For ``peer-copy``, which moves only the
remote bytes, that equals the ratio of link bandwidths.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import sys
from typing import Optional

import torch

from deep_ep.bench.timing import median

REDUCE = "time_us: max over ranks of each rank's median; gbps: mean bytes per rank / time_us"
RATIO = "baseline time_us / row time_us for the same op, wire and tokens (>1: faster than baseline)"


def _gbps(nbytes: Optional[float], time_us: float) -> Optional[float]:
    """GB/s of ``nbytes`` moved in ``time_us`` (None where the row has no such bytes)."""
    if nbytes is None:
        return None
    return nbytes / (time_us * 1e3) if time_us > 0 else 0.0


def format_gbps(value: Optional[float]) -> str:
    """A bandwidth for a table: two decimals from 1 GB/s up, three significant digits below (CPU runs
    move little: ``0.0342``, not ``0.00``), ``-`` where the row has none.

    Args:
        value: GB/s, or ``None``.

    Returns:
        The text.
    """
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


def _mean(values) -> Optional[float]:
    """Mean of the values that are not None; None if there are none."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def reduce_rows(cfg, per_rank: list) -> list:
    """Merge the ranks' records of each case into one docs/bench.md row.

    Args:
        cfg: the run.
        per_rank: every rank's list of records.

    Returns:
        The rows (with ``ratio_vs`` against the baselines and, for compressed rows, ``time_vs_bf16``).
    """
    by_case: dict = {}
    for records in per_rank:
        for rec in records:
            key = (rec["tokens"], rec["backend"], rec["op"], rec["wire"], rec["timing"])
            by_case.setdefault(key, []).append(rec)
    rows = []
    for (tokens, backend, op, wire, timing), recs in by_case.items():
        medians = [median(r["times_us"]) for r in recs]
        t = max(medians)
        bytes_logical, bytes_link = _mean(r["bytes_logical"] for r in recs), _mean(r["bytes_link"] for r in recs)
        rows.append(
            dict(
                backend=backend,
                op=op,
                wire=wire,
                tokens=tokens,
                hidden=cfg.hidden,
                topk=cfg.topk,
                experts=cfg.experts,
                num_sms=recs[0].get("num_sms"),
                time_us=t,
                gbps_logical=_gbps(bytes_logical, t),
                gbps_link=_gbps(bytes_link, t),
                graph=timing.endswith("graph"),
                timing=timing,
                routing=cfg.routing,
                iters=cfg.iters,
                time_us_per_rank=medians,
                bytes_logical=bytes_logical,
                bytes_link=bytes_link,
                recv_rows=_mean(r["recv_rows"] for r in recs),
                **({"transport": recs[0]["transport"]} if "transport" in recs[0] else {}),
                **{k: recs[0][k] for k in ("compression_level", "wire_row_bytes") if k in recs[0]},
                **(
                    {
                        "rel_err_mean": _mean(r["rel_err_mean"] for r in recs),
                        "rel_err_max": max(r["rel_err_max"] for r in recs),
                    }
                    if "rel_err_mean" in recs[0]
                    else {}
                ),
                rows_match=all(r.get("expected_rows") in (None, r["recv_rows"]) for r in recs),
            )
        )
    plain = {(r["tokens"], r["backend"], r["op"], r["timing"]): r for r in rows if r["wire"] == "bf16"}
    for r in rows:  # compressed dispatch: its time over the bf16 dispatch's
        p = plain.get((r["tokens"], r["backend"], r["op"], r["timing"]))
        if "compression_level" in r and p is not None and p["time_us"]:
            r["time_vs_bf16"] = r["time_us"] / p["time_us"]
    add_ratios(cfg, rows)
    return rows


def add_ratios(cfg, rows: list) -> None:
    """Set each deep_ep row's ``ratio_vs``: the baseline's time (same tokens, op and wire) over its own.

    Args:
        cfg: the run.
        rows: the rows, changed in place.
    """
    baselines = {cfg.raw_name, "peer-copy"}
    base = {(r["tokens"], r["op"], r["wire"], r["backend"]): r for r in rows if r["backend"] in baselines}
    for r in rows:
        if r["backend"] in baselines:
            continue
        r["ratio_vs"] = {
            b: base[k]["time_us"] / r["time_us"]
            for b in sorted(baselines)
            if (k := (r["tokens"], r["op"], r["wire"], b)) in base and r["time_us"] > 0
        }


def build_result(cfg, raw: dict, command: str) -> dict:
    """The docs/bench.md result object of one run (plus extra keys the format allows).

    Args:
        cfg: the run.
        raw: what rank 0 wrote (``records``, ``skipped``, ``card``, ``backends``, ``unavailable``).
        command: the command line.

    Returns:
        The result object.
    """
    from deep_ep.bench.environment import versions

    v = versions()
    return {
        "workload": cfg.workload,
        "card": raw["card"],
        "num_ranks": cfg.world_size,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": v["triton"],
        "command": command,
        "rows": reduce_rows(cfg, raw["records"]),
        "deep_ep": v["deep_ep"],
        "python": v["python"],
        "mode": "normal",
        "device": cfg.device,
        "dist_backend": cfg.dist_backend,
        "routing": cfg.routing,
        "iters": cfg.iters,
        "warmup": cfg.warmup,
        "l2_flush_bytes": cfg.flush_bytes if cfg.device == "cuda" else 0,
        "backends": raw["backends"],
        "reduce": REDUCE,
        "ratio": RATIO,
        "skipped": raw["skipped"],
        "unavailable": raw.get("unavailable", {}),
    }


def _fmt(value, spec: str) -> str:
    """``value`` formatted with ``spec``, or ``-`` for None / non-finite."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def format_table(result: dict) -> str:
    """The result as a fixed-width text table, then the skipped cases with their reasons.

    Args:
        result: a result object of the normal workload.

    Returns:
        The text.
    """
    raw_name = f"{result['dist_backend']}-raw"
    baselines = [raw_name] + (["peer-copy"] if result["device"] == "cuda" else [])
    sweep = len({r.get("num_sms") for r in result["rows"]} - {None}) > 1  # (baselines have None)
    head = (
        ["backend", "op", "timing", "wire", "tokens"]
        + (["SMs"] if sweep else [])
        + ["time_us", "GB/s logical", "GB/s link"]
    )
    head += [f"vs {b}" for b in baselines]
    errors = any("rel_err_mean" in r for r in result["rows"])
    if errors:
        head += ["rel err", "time / bf16"]
    lines = []
    for r in result["rows"]:
        name = (
            r["backend"] if r.get("transport", r["backend"]) == r["backend"] else f"{r['backend']} ({r['transport']})"
        )
        cells = (
            [name, r["op"], r["timing"], r["wire"], str(r["tokens"])]
            + ([_fmt(r.get("num_sms"), "d")] if sweep else [])
            + [_fmt(r["time_us"], ".1f"), format_gbps(r["gbps_logical"]), format_gbps(r["gbps_link"])]
        )
        cells += [_fmt(r.get("ratio_vs", {}).get(b), ".2f") for b in baselines]
        if errors:
            cells += [_fmt(r.get("rel_err_mean"), ".4f"), _fmt(r.get("time_vs_bf16"), ".2f")]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
    left = 4  # text columns are left-aligned, numbers right-aligned

    def fmt_line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [
        f"{result['workload']} on {result['num_ranks']} x {result['card']} "
        f"({result['dist_backend']}, routing {result['routing']}, median of {result['iters']}, "
        f"time = slowest rank)",
        fmt_line(head),
        fmt_line(["-" * w for w in widths]),
    ]
    out += [fmt_line(c) for c in lines]
    skipped = {}
    for s in result["skipped"]:
        skipped.setdefault((s["backend"], s["reason"]), []).append(f"{s['op']}/{s['wire']}/{s['timing']}")
    if skipped:
        out.append("skipped:")
        for (backend, reason), what in skipped.items():
            out.append(f"  {backend} ({len(what)} case{'' if len(what) == 1 else 's'}): {reason}")
    if not all(r["rows_match"] for r in result["rows"]):
        bad = sorted({r["backend"] for r in result["rows"] if not r["rows_match"]})
        out.append(f"warning: received row counts differ from the routing's for: {', '.join(bad)}")
    return "\n".join(out)


def result_path(path: str, result: dict) -> str:
    """Where :func:`write_json` writes.

    Args:
        path: a file, or a directory (an existing one, or a path ending in the separator).

    Returns:
        ``path`` itself, or ``<path>/<date>-<card>-<workload>.json`` when it names a directory.
    """
    if path.endswith(os.sep) or os.path.isdir(path):
        card = re.sub(r"[^A-Za-z0-9]+", "-", result["card"]).strip("-").lower() or "unknown"
        return os.path.join(path, f"{result['date']}-{card}-{result['workload']}.json")
    return path


def write_json(result: dict, path: str) -> str:
    """Write ``result`` as JSON.

    Args:
        result: the result object.
        path: a file or a directory (:func:`result_path`).

    Returns:
        The file written.
    """
    path = result_path(path, result)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {path}", file=sys.stderr)
    return path
