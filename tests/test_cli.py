"""Tests of the ``deep-ep`` command line and of the benchmark's result format.

The CLI runs in subprocesses (as a user runs it); the benchmark's pure parts
(options, workload, reduction) are checked in-process. Everything runs on CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import runpy
import subprocess
import sys

import pytest
import torch

from deep_ep import cli
from deep_ep.bench import launch, options, report, workload

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_KEYS = {
    "backend",
    "op",
    "wire",
    "tokens",
    "hidden",
    "topk",
    "experts",
    "num_sms",
    "time_us",
    "gbps_logical",
    "gbps_link",
    "graph",
}
TOP_KEYS = {"workload", "card", "num_ranks", "date", "torch", "triton", "command", "rows"}


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "deep_ep", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _bench_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    options.add_arguments(p)
    return p.parse_args(list(argv))


def test_info_text_and_json():
    out = _run("info")
    assert out.returncode == 0, out.stderr
    assert "deep_ep backends" in out.stdout and "auto ->" in out.stdout
    out = _run("info", "--json")
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["versions"]["torch"] == torch.__version__
    assert rep["versions"]["deep_ep"]
    assert rep["machine"]["device_count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert rep["backends"]["collective"]["supported"] is True
    assert rep["auto"]["backend"] in rep["backends"]
    for b in rep["backends"].values():
        assert isinstance(b["reason"], str) and b["reason"]


def test_bench_cpu_writes_bench_md_json(tmp_path):
    path = tmp_path / "res.json"
    out = _run(
        "bench",
        "--device",
        "cpu",
        "--world-size",
        "2",
        "--tokens",
        "32",
        "--hidden",
        "256",
        "--experts",
        "8",
        "--topk",
        "2",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--no-progress",
        "--json",
        str(path),
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(path.read_text())
    assert TOP_KEYS <= set(res)
    assert res["workload"] == "normal" and res["card"] == "cpu" and res["num_ranks"] == 2
    assert res["command"].endswith("--json " + str(path)) and "bench" in res["command"]
    assert res["reduce"] and res["ratio"]
    cases = set()
    for row in res["rows"]:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert math.isfinite(row["time_us"]) and row["time_us"] > 0
        assert (row["tokens"], row["hidden"], row["topk"], row["experts"]) == (32, 256, 2, 8)
        assert row["graph"] is False and row["timing"] in ("cached", "fresh")
        assert row["gbps_logical"] > 0 and row["gbps_link"] >= 0 and row["rows_match"]
        cases.add((row["backend"], row["op"], row["timing"]))
    assert {
        ("collective", "dispatch", "cached"),
        ("collective", "dispatch", "fresh"),
        ("collective", "combine", "cached"),
        ("gloo-raw", "dispatch", "cached"),
        ("gloo-raw", "combine", "cached"),
    } <= cases
    coll = [r for r in res["rows"] if r["backend"] == "collective"]
    assert all(r["ratio_vs"]["gloo-raw"] > 0 for r in coll)
    # Backends that cannot run here are listed with a reason, not silently dropped.
    tried = {r["backend"] for r in res["rows"]} | {s["backend"] for s in res["skipped"]}
    assert set(res["backends"]) <= tried
    assert all(s["reason"] for s in res["skipped"])
    assert "collective" in out.stdout and "gloo-raw" in out.stdout  # the printed table


def test_demo_and_bad_mode_exit_2(capsys):
    assert cli.main(["demo", "--device", "cpu", "--experts", "3"]) == 2
    assert "--experts must be a multiple" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--mode", "decode"])  # not a mode: argparse rejects it


def test_bench_normal_wrapper_help(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_normal.py", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(os.path.join(REPO, "benchmarks", "bench_normal.py"), run_name="__main__")
    assert exc.value.code == 0
    assert "--tokens" in capsys.readouterr().out


def test_options_defaults_and_errors():
    cfg = options.config_from_args(_bench_args("--device", "cpu"))
    assert (cfg.world_size, cfg.tokens, cfg.hidden, cfg.topk, cfg.experts) == (2, (256,), 1024, 4, 32)
    assert cfg.wires == ("bf16",) and cfg.raw_name == "gloo-raw" and cfg.backends is None
    cfg = options.config_from_args(
        _bench_args(
            "--device", "cpu", "--sweep", "--backend", "collective,nvlink", "--backend", "collective", "--dtype", "both"
        )
    )
    assert cfg.tokens == options.SWEEP_TOKENS and cfg.workload == "sweep"
    assert cfg.backends == ("collective", "nvlink") and cfg.wires == ("bf16", "fp8")
    for bad in (["--experts", "7"], ["--topk", "64"], ["--dtype", "fp8", "--hidden", "100"], ["--num-sms", "3"]):
        with pytest.raises(options.BenchOptionError):
            options.config_from_args(_bench_args("--device", "cpu", *bad))


@pytest.mark.parametrize("routing", ["uniform", "zipf1.2"])
def test_routing_distinct_experts_and_counts(routing):
    idx, w = workload.make_routing(64, 16, 4, routing, seed=1, rank=0)
    assert idx.dtype == torch.int64 and idx.shape == (64, 4) and w.shape == (64, 4)
    assert all(len(set(r)) == 4 for r in idx.tolist())
    assert torch.allclose(w.sum(1), torch.ones(64))
    counts = workload.send_counts_of(idx, 16, 4).tolist()
    expect = [sum(any(e // 4 == r for e in row) for row in idx.tolist()) for r in range(4)]
    assert counts == expect
    assert workload.row_bytes("bf16", 7168) == 14336
    assert workload.row_bytes("fp8", 7168) == 7168 + 4 * 56


def test_reduce_rows_max_over_ranks_and_ratios():
    cfg = options.config_from_args(_bench_args("--device", "cpu", "--tokens", "8", "--hidden", "128"))

    def rec(backend, times, rows, remote):
        return dict(
            backend=backend,
            op="dispatch",
            wire="bf16",
            tokens=8,
            timing="cached",
            times_us=times,
            bytes_logical=rows * 256,
            bytes_link=remote * 256,
            recv_rows=rows,
            remote_rows=remote,
            num_sms=None,
            expected_rows=rows,
        )

    per_rank = [
        [rec("collective", [10, 20, 30], 10, 5), rec("gloo-raw", [5, 5, 5], 10, 5)],
        [rec("collective", [40, 40, 40], 12, 6), rec("gloo-raw", [8, 8, 8], 12, 6)],
    ]
    rows = {r["backend"]: r for r in report.reduce_rows(cfg, per_rank)}
    c = rows["collective"]
    assert c["time_us"] == 40 and c["time_us_per_rank"] == [20, 40]
    assert c["gbps_logical"] == pytest.approx(11 * 256 / 40e3)
    assert c["gbps_link"] == pytest.approx(5.5 * 256 / 40e3)
    assert c["ratio_vs"] == {"gloo-raw": pytest.approx(8 / 40)}
    assert "ratio_vs" not in rows["gloo-raw"]


def test_graph_cases_on_cuda_only_and_flagged_in_rows():
    import dataclasses

    from deep_ep.bench import cases

    cpu = options.config_from_args(_bench_args("--device", "cpu", "--tokens", "8", "--hidden", "128"))
    assert not any(c[4] == "graph" for c in cases.plan(cpu, ["collective"]))
    cuda = dataclasses.replace(cpu, device="cuda", wires=("bf16", "fp8"))
    planned = cases.plan(cuda, ["nvlink"])
    graphs = [c for c in planned if c[4] == "graph"]
    assert graphs == [
        (8, "nvlink", "dispatch", "bf16", "graph"),
        (8, "nvlink", "dispatch", "fp8", "graph"),
        (8, "nvlink", "combine", "bf16", "graph"),
    ]
    worst = [c[3:] for c in planned if c[4].startswith("worst")]
    assert worst == [("bf16", "worst"), ("bf16", "worst-graph"), ("fp8", "worst"), ("fp8", "worst-graph")]
    rec = dict(
        backend="nvlink",
        op="dispatch",
        wire="bf16",
        tokens=8,
        timing="graph",
        times_us=[3.0],
        bytes_logical=256,
        bytes_link=128,
        recv_rows=1,
        remote_rows=1,
        num_sms=24,
        expected_rows=1,
    )
    row = report.reduce_rows(cuda, [[rec], [dict(rec, times_us=[5.0])]])[0]
    assert row["graph"] is True and row["timing"] == "graph" and row["time_us"] == 5.0
    row = report.reduce_rows(cuda, [[dict(rec, timing="worst-graph")]])[0]
    assert row["graph"] is True and row["timing"] == "worst-graph"


def test_bench_compression_rows():
    """--compression adds cached dispatches of the bf16 rows compressed by deep_ep, each row with the
    codec's error and its time over the bf16 dispatch's."""
    from deep_ep.bench import cases

    cfg = options.config_from_args(
        _bench_args(
            "--device",
            "cpu",
            "--tokens",
            "8",
            "--hidden",
            "128",
            "--compression",
            "8,auto",
            "--compression-ratio",
            "0.4",
        )
    )
    assert cfg.compression == (8, "auto") and cfg.compression_ratio == 0.4
    planned = [c for c in cases.plan(cfg, ["collective"]) if c[3] in ("c8", "auto")]
    assert planned == [(8, "collective", "dispatch", "c8", "cached"), (8, "collective", "dispatch", "auto", "cached")]
    with pytest.raises(options.BenchOptionError, match="--compression"):
        options.config_from_args(_bench_args("--device", "cpu", "--compression", "2"))
    base = dict(
        backend="collective",
        op="dispatch",
        tokens=8,
        timing="cached",
        bytes_logical=1,
        bytes_link=1,
        recv_rows=1,
        remote_rows=1,
    )
    recs = [
        dict(base, wire="bf16", times_us=[10.0]),
        dict(
            base,
            wire="c8",
            times_us=[5.0],
            compression_level=8,
            rel_err_mean=0.02,
            rel_err_max=0.03,
            wire_row_bytes=132,
        ),
    ]
    rows = {r["wire"]: r for r in report.reduce_rows(cfg, [recs])}
    assert rows["c8"]["time_vs_bf16"] == 0.5 and rows["c8"]["rel_err_mean"] == 0.02
    assert "rel err" in report.format_table(
        dict(
            workload="normal",
            num_ranks=2,
            card="cpu",
            dist_backend="gloo",
            routing="uniform",
            iters=1,
            device="cpu",
            rows=list(rows.values()),
            skipped=[],
        )
    )


def test_bench_low_latency_cpu(capsys, tmp_path):
    """--mode low-latency on CPU ranks: dispatch and combine rows for the collective backend, DeepEP's
    byte counting, docs/bench.md's experts (256, 288 where the ranks do not divide 256)."""
    cfg = options.config_from_args(_bench_args("--device", "cpu", "--mode", "low-latency"))
    assert cfg.workload == "low-latency" and cfg.tokens == (32,) and not cfg.experts_given
    cfg = options.config_from_args(_bench_args("--device", "cpu", "--mode", "low-latency", "--sweep"))
    assert cfg.tokens == options.LL_SWEEP
    out = tmp_path / "ll.json"
    assert (
        cli.main(
            [
                "bench",
                "--device",
                "cpu",
                "--mode",
                "low-latency",
                "--tokens",
                "8",
                "--hidden",
                "256",
                "--iters",
                "2",
                "--warmup",
                "1",
                "--backend",
                "collective",
                "--no-progress",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["workload"] == "low-latency" and res["num_ranks"] == 2
    rows = {(r["op"], r["wire"]): r for r in res["rows"]}
    assert set(rows) == {("dispatch", "fp8"), ("combine", "bf16")} and rows[("dispatch", "fp8")]["experts"] == 256
    assert rows[("dispatch", "fp8")]["pairs_per_rank"] == 8 * 4  # top-4 of 256, distinct
    # DeepEP's byte counting (docs/bench.md), not a rounded-away 0.00
    for r in res["rows"]:
        per_pair = 256 + 4 * 256 // 128 + 16 if r["op"] == "dispatch" else 2 * 256
        assert r["gbps_logical"] == pytest.approx(r["pairs_per_rank"] * per_pair / (r["time_us"] * 1e3))
    # the ranks take their share of the cores as torch threads, as the normal mode's do
    assert res["threads_per_rank"] == launch.cpu_threads_per_rank(2)
    captured = capsys.readouterr()
    assert "low-latency on 2 x cpu" in captured.out
    lines = captured.out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("backend"))
    assert set(lines[head + 1].replace(" ", "")) == {"-"}  # the separator the normal table has
    assert "0.00 " not in captured.out and "GB/s: bytes per valid (token, expert) pair" in captured.out
    assert "wire fp8 dispatch, bf16 combine" in captured.err and "wire bf16," not in captured.err


def test_low_latency_banner_and_cpu_tokens_note():
    """The low-latency banner names its real wire formats and experts; on CPU it says how many tokens it
    uses and why."""
    from deep_ep import bench

    cfg = options.config_from_args(_bench_args("--device", "cpu", "--mode", "low-latency"))
    line = bench.banner(cfg)
    assert "wire fp8 dispatch, bf16 combine" in line and "of 256 experts" in line and "tokens 32 per rank" in line
    assert any("32 tokens per rank on CPU" in n and "128" in n and "--tokens" in n for n in cfg.notes), cfg.notes
    cfg = options.config_from_args(_bench_args("--device", "cpu", "--mode", "low-latency", "--tokens", "8"))
    assert not any("tokens per rank on CPU" in n for n in cfg.notes)
    assert "wire bf16 dispatch, bf16 combine" in bench.banner(options.config_from_args(_bench_args("--device", "cpu")))


def test_gbps_format_keeps_small_figures():
    assert report.format_gbps(0.004213) == "0.00421" and report.format_gbps(0.0) == "0"
    assert report.format_gbps(12.345) == "12.35" and report.format_gbps(None) == "-"


def test_demo_cpu(tmp_path, capfd):
    """deep-ep demo as the README runs it (2 CPU ranks, default 20 steps): every setup trains, the losses are
    what the README says a run prints, no rank warns, JSON rows and a chart."""
    out, png = tmp_path / "demo.json", tmp_path / "demo.png"
    assert cli.main(["demo", "--device", "cpu", "--no-progress", "--json", str(out), "--png", str(png)]) == 0
    res = json.loads(out.read_text())
    assert [r["setup"] for r in res["rows"]] == ["collective", "deep_ep", "deep_ep-overlap"]
    for r in res["rows"]:
        assert r["loss_last"] < 0.6 * r["loss_first"] and r["tokens_per_s"] > 0
        assert 0 <= r["exposed_comm_fraction"] <= 1
    captured = capfd.readouterr()  # the ranks' own output included (they write to the inherited fds)
    assert "tokens/s" in captured.out
    assert "Warning" not in captured.err and "requires_grad" not in captured.err, captured.err
    readme = open(os.path.join(REPO, "README.md")).read()
    claim = re.search(r"loss falls from about ([0-9.]+) to about ([0-9.]+)\s+in (\d+) steps", readme)
    assert claim, "README.md: the demo's loss claim"
    first, last, steps = float(claim[1]), float(claim[2]), int(claim[3])
    assert steps == len(res["rows"][0]["losses"])
    for r in res["rows"]:
        assert abs(r["loss_first"] - first) <= 0.1 and abs(r["loss_last"] - last) <= 0.15, (r, claim[0])
    try:
        import matplotlib  # noqa: F401

        assert png.exists() and png.stat().st_size > 1000
    except ImportError:
        pass


def test_info_topology(monkeypatch, capsys):
    """deep-ep info shows the node layout of a torchrun job (and says 'auto' goes hierarchical across nodes)."""
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert cli.main(["info", "--json"]) == 0
    topo = json.loads(capsys.readouterr().out)["topology"]
    assert topo["ranks_per_node"] == 8 and topo["nodes"] == 2 and "hierarchical" in topo["note"]


def test_bench_num_sms_sweep_in_one_run(tmp_path, capsys):
    """--num-sms 2,4: one row set per SM count in one result, the baselines once, every deep_ep row's ratio
    against them; bad values exit 2."""
    path = tmp_path / "sms.json"
    assert (
        cli.main(
            [
                "bench",
                "--device",
                "cpu",
                "--world-size",
                "2",
                "--tokens",
                "16",
                "--hidden",
                "64",
                "--experts",
                "4",
                "--topk",
                "2",
                "--iters",
                "2",
                "--warmup",
                "0",
                "--no-progress",
                "--backend",
                "collective",
                "--num-sms",
                "2,4",
                "--json",
                str(path),
                "--png",
                str(tmp_path / "sms.png"),
            ]
        )
        == 0
    )
    res = json.loads(path.read_text())
    assert res["num_sms_sweep"] == [2, 4]
    coll = [r for r in res["rows"] if r["backend"] == "collective"]
    assert sorted({r["num_sms"] for r in coll}) == [2, 4]
    assert len(coll) == 2 * len([r for r in coll if r["num_sms"] == 2])
    raw = [r for r in res["rows"] if r["backend"] == "gloo-raw"]
    assert raw and all(r["num_sms"] is None for r in raw) and len({(r["op"], r["wire"]) for r in raw}) == len(raw)
    assert all(r["ratio_vs"]["gloo-raw"] > 0 for r in coll)
    assert " SMs " in capsys.readouterr().out
    try:
        import matplotlib  # noqa: F401

        assert (tmp_path / "sms.png").stat().st_size > 1000
    except ImportError:
        pass
    for bad in ("3", "2,x", "0"):
        assert cli.main(["bench", "--device", "cpu", "--num-sms", bad]) == 2


def test_bench_num_sms_sweep_rejected_for_low_latency(capsys):
    assert cli.main(["bench", "--device", "cpu", "--mode", "low-latency", "--num-sms", "2,4"]) == 2
    assert "one value with --mode low-latency" in capsys.readouterr().err


def test_bench_unknown_option_prints_the_bench_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: deep-ep bench" in err and "unrecognized arguments: --bogus" in err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--bogus"])
    assert "usage: deep-ep demo" in capsys.readouterr().err


def test_demo_names_only_the_rule_it_breaks(capsys):
    assert cli.main(["demo", "--device", "cpu", "--world-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "--experts must be a multiple of the ranks: 8 experts on 3 ranks" in err
    assert "--topk" not in err and "--steps" not in err and "--lr" not in err
    assert cli.main(["demo", "--device", "cpu", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "--steps must be >= 1, got 0" in err and "--experts" not in err


def test_help_texts_are_plain_text():
    """``--help`` of every subcommand shows no reStructuredText markup (double backticks, :roles:)."""
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subs.choices) == {"info", "bench", "demo", "tools"}
    for name, sub in subs.choices.items():
        text = sub.format_help()
        assert "``" not in text and ":class:" not in text and ":func:" not in text, (name, text)
    assert "deep-ep demo: train a small MoE transformer" in subs.choices["demo"].format_help()


def test_demo_backend_checked_by_the_ranks_before_training(monkeypatch, capfd):
    """--backend nvlink on CPU ranks: the ranks make a Buffer of every backend the setups need before any
    training, so the demo ends at once with one line naming the rank and why (the transport's support
    check), exit 1, no traceback."""
    monkeypatch.delenv("DEEP_EP_NVLINK_EMULATE", raising=False)  # (the emulated nvlink would run on CPU)
    assert cli.main(["demo", "--device", "cpu", "--backend", "nvlink", "--no-progress", "--json", ""]) == 1
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and "tokens/s" not in captured.out, captured.err
    line = [x for x in captured.err.splitlines() if x.startswith("deep-ep demo: error:")]
    assert len(line) == 1 and "--backend nvlink cannot run on these ranks: rank 0:" in line[0], captured.err
    assert "support check: the group is not a CUDA (NCCL) group" in line[0]


def test_bench_backend_that_cannot_run_here(monkeypatch, capsys):
    """--backend nvlink on CPU ranks: nothing but baselines would run, so it says why (the rank, the
    Buffer's error, the transport's support check) and exits 1 before timing anything; with another
    backend beside it, it says so and runs that one."""
    monkeypatch.delenv("DEEP_EP_NVLINK_EMULATE", raising=False)  # (the emulated nvlink would run on CPU)
    small = ["--device", "cpu", "--tokens", "16", "--hidden", "64", "--experts", "4", "--topk", "2"]
    small += ["--iters", "1", "--warmup", "0", "--no-progress"]
    assert cli.main(["bench", "--backend", "nvlink", *small]) == 1
    captured = capsys.readouterr()
    assert "deep-ep bench: error: --backend nvlink cannot run here: rank 0:" in captured.err
    assert "support check: the group is not a CUDA (NCCL) group" in captured.err
    assert "gloo-raw" not in captured.out  # no baseline was timed for nothing
    assert cli.main(["bench", "--backend", "nvlink,collective", *small]) == 0
    captured = capsys.readouterr()
    assert "note: --backend nvlink cannot run here, skipped: rank 0:" in captured.err
    assert "collective" in captured.out and "gloo-raw" in captured.out


def test_num_sms_on_cpu_says_it_has_no_effect(capsys):
    cfg = options.config_from_args(_bench_args("--device", "cpu", "--num-sms", "24"))
    assert cfg.num_sms == 24 and any("no effect on CPU" in n for n in cfg.notes)
    assert not options.config_from_args(_bench_args("--device", "cpu")).notes


def test_demo_loss_curves_distinguishable():
    """Each setup's curve has its own line style and marker (the curves coincide), steps start at 1, and
    the step axis has integer ticks."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from deep_ep.bench import demo

    rows = [dict(setup=s, losses=[4.3, 2.0, 1.1]) for s in demo.SETUPS]
    ax = Figure().subplots()
    demo.plot_losses(ax, rows)
    styles = {(line.get_linestyle(), line.get_marker()) for line in ax.get_lines()}
    assert len(ax.get_lines()) == 3 and len(styles) == 3
    assert list(ax.get_lines()[0].get_xdata()) == [1, 2, 3]
    loc = ax.xaxis.get_major_locator()
    assert isinstance(loc, MaxNLocator) and all(float(t).is_integer() for t in loc.tick_values(1, 20))
    assert ax.get_legend() is not None


def test_bench_emulated_nvlink_runs_on_cpu_ranks(monkeypatch, capsys, tmp_path):
    """The backend check is the ranks' own (their group): with the emulated nvlink
    (``DEEP_EP_NVLINK_EMULATE=1``) --backend nvlink runs on CPU ranks."""
    monkeypatch.setenv("DEEP_EP_NVLINK_EMULATE", "1")
    path = tmp_path / "nvlink.json"
    argv = ["bench", "--device", "cpu", "--backend", "nvlink", "--tokens", "16", "--hidden", "64", "--experts", "4"]
    argv += ["--topk", "2", "--iters", "1", "--warmup", "0", "--no-progress", "--json", str(path)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    res = json.loads(path.read_text())
    assert {(r["backend"], r["op"]) for r in res["rows"]} >= {("nvlink", "dispatch"), ("nvlink", "combine")}
    assert not res["unavailable"]
