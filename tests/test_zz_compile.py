"""The kernels the interpreted tests launched, compiled for Hopper (sm_90) on this machine (no GPU needed:
``tests/_compile.py``). Collected last, so that the session's kernel tests have recorded their launches."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests import _compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_interpreted_kernels_compile_for_hopper(tmp_path):
    """Every kernel signature recorded this session compiles to a cubin for sm_90 (Triton's front end, LLVM
    and ptxas), with the GPU's INTERP / ROLE constexprs."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("kernels were compiled for the GPU this session (no interpreter)")
    recorded = [[m, n, sig, warps] for (m, n), kept in sorted(_compile.RECORDED.items()) for sig, warps in kept]
    if not recorded:
        pytest.skip("no kernel was launched earlier in this session")
    path = tmp_path / "signatures.json"
    path.write_text(json.dumps(recorded))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-m", "tests._compile", str(path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{len(recorded)} signatures; refused:\n{done.stdout}\n{done.stderr[-3000:]}"
    print(done.stderr.strip().splitlines()[-1])
