"""The README quickstart runs as written under torchrun (2 ranks; gloo on CPU, NCCL on GPUs)."""

from __future__ import annotations

import os
import subprocess
import sys

from deep_ep.bench.launch import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_under_torchrun():
    env = dict(os.environ, OMP_NUM_THREADS="1", NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),  # free: other test sessions may share the machine
            os.path.join(ROOT, "examples", "quickstart.py"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("combine OK") == 2, proc.stdout


def test_quickstart_notebook_runs_on_cpu(tmp_path):
    """examples/quickstart.ipynb executes top to bottom on the CPU (nbclient, a fresh kernel)."""
    import pytest

    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(os.path.join(ROOT, "examples", "quickstart.ipynb"), as_version=4)
    env_keep = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the notebook's CPU path, even on a GPU machine
    try:
        nbclient.NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        if env_keep is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = env_keep
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "combine OK" in text and "tokens/s" in text
    plot = [c for c in nb.cells if "plot" in c.get("metadata", {}).get("tags", [])]
    assert len(plot) == 1, "the notebook's plot cell (tagged 'plot')"
    images = [o for o in plot[0].outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1, plot[0].outputs  # the plot is shown, not only drawn


def test_quickstart_without_torchrun_prints_the_command():
    """Run as a plain script, the quickstart says how to start it instead of torch's rendezvous error."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, os.path.join("examples", "quickstart.py")],
        cwd=ROOT,
        env=dict(env, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "examples/quickstart.py runs as 2 ranks; start it with:  torchrun --nproc-per-node 2 examples/quickstart.py"
    ], proc.stderr
