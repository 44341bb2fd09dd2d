"""examples/hf_moe.py and benchmarks/bench_hf.py --small run under torchrun (2 CPU ranks with gloo)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from deep_ep.bench.launch import free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torchrun(script, *args, torchrun_args=()):
    """Run ``script`` under torchrun on 2 CPU ranks, on a free port (other test sessions may share the
    machine); its stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            *torchrun_args,
            os.path.join(ROOT, script),
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_example_under_torchrun():
    """Both ranks' results, printed by rank 0 in rank order (torchrun shows only local rank 0's output
    here, so rank 1's lines appear only if rank 0 prints them: the ranks' lines cannot interleave)."""
    out = _torchrun("examples/hf_moe.py", "--family", "gpt_oss", torchrun_args=("--local-ranks-filter", "0"))
    errs = [float(e) for e in re.findall(r"max \|logits - unpatched logits\| = ([0-9.]+e[-+][0-9]+)", out)]
    assert len(errs) == 2 and max(errs) < 1e-5, out
    assert out.count("generated [") == 2 and out.count("expert parameters 25344 of 50688") == 2, out
    ranks = [int(r) for r in re.findall(r"^(?:\[\S+\]:)?rank (\d+): ", out, flags=re.M)]
    assert ranks == [0, 1] * 4, out  # blocks, loss, logits, generation: rank 0 then rank 1 each time


def test_benchmark_small(tmp_path):
    path = tmp_path / "bench_hf.json"
    _torchrun(
        "benchmarks/bench_hf.py",
        "--small",
        "--modes",
        "deep_ep,all_to_all",
        "--iters",
        "2",
        "--json",
        str(path),
    )
    result = json.loads(path.read_text())
    assert result["card"].startswith("cpu") and result["world_size"] == 2
    assert [r["mode"] for r in result["results"]] == ["deep_ep", "all_to_all"]
    for r in result["results"]:
        assert r["tokens_per_s"] > 0 and r["tokens_per_step"] == 2 * result["tokens_per_rank"], r
