"""Shared pytest configuration for the deep_ep test suite.

Provides the session-scoped ``rank_pool`` fixture (see ``tests/_pool.py``),
the ``gpu`` and ``slow`` markers, and a default per-test timeout when the
optional pytest-timeout plugin is installed.
"""

from __future__ import annotations

import os
import sys

import pytest

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:  # workers unpickle test functions as ``tests.<module>``
    sys.path.insert(0, _REPO_ROOT)


def _interpret_kernels_without_cuda() -> None:
    """Without a GPU, the Triton kernels run under Triton's interpreter (``tests/_interpret.py``): set
    ``TRITON_INTERPRET=1`` before any kernel module is imported (here, and in the rank pool's workers,
    which inherit the environment) and install the interpreter's fidelity fixes."""
    import importlib.util

    try:
        import torch

        if torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
            return
    except Exception:  # no torch: nothing runs
        return
    if "triton" in sys.modules:  # pragma: no cover - Triton's own kernels were made before the switch
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: it decides at import
    from tests import _interpret

    if _interpret.enabled():
        _interpret.install()
        from tests import _compile

        _compile.install()  # signatures for tests/test_zz_compile.py


_interpret_kernels_without_cuda()

from tests._pool import RankPool, close_pools, prestart_forkserver  # noqa: E402

#: Per-test timeout (seconds) applied when pytest-timeout is installed and no
#: timeout was configured on the command line, in an ini file or via
#: ``PYTEST_TIMEOUT``.
DEFAULT_TEST_TIMEOUT = 300


#: ``DEEP_EP_TEST_SHARE_GPU=N`` runs the multi-GPU tests with N ranks sharing the visible GPUs (rank r on
#: ``cuda:r % count``, a gloo group carrying CUDA tensors instead of NCCL, which refuses two ranks on one
#: GPU). Symmetric memory between processes of one GPU is real CUDA IPC, so the nvlink transport's
#: kernels, barriers and peer stores run as on N GPUs (not at link speed; contexts time-slice).
SHARE_GPU = int(os.environ.get("DEEP_EP_TEST_SHARE_GPU", "0") or 0)


def _real_cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def _cuda_device_count() -> int:
    """CUDA devices the gpu tests may use: the visible ones, or ``SHARE_GPU`` virtual ones on them."""
    real = _real_cuda_device_count()
    return max(real, SHARE_GPU) if real else 0


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Register markers; set a default per-test timeout if pytest-timeout is present."""
    config.addinivalue_line("markers", "gpu(n=2): needs CUDA with at least n GPUs (auto-skipped otherwise)")
    config.addinivalue_line("markers", "slow: slow test")
    config.addinivalue_line("markers", "kernels: Triton kernels against their twins (CUDA, or the interpreter)")
    if config.pluginmanager.hasplugin("timeout"):
        try:
            configured = config.getoption("timeout", default=None) is not None or bool(config.getini("timeout"))
        except (ValueError, KeyError):
            configured = True
        if not configured and "PYTEST_TIMEOUT" not in os.environ:
            config.option.timeout = DEFAULT_TEST_TIMEOUT


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu``-marked tests unless enough CUDA devices (``gpu(n)``, 2 by default); pre-start the forkserver.

    If any selected test uses ``rank_pool``, the multiprocessing forkserver
    (which imports torch once for all workers) is started now so that its
    ~2 s import overlaps with the rest of the session instead of delaying the
    first multi-rank test.
    """
    if not config.option.collectonly and any("rank_pool" in getattr(item, "fixturenames", ()) for item in items):
        try:
            prestart_forkserver()
        except Exception:  # pragma: no cover - the pool reports real problems later
            pass
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    count = _cuda_device_count()
    for item in gpu_items:
        marker = item.get_closest_marker("gpu")
        need = marker.args[0] if marker.args else 2
        if count < need:
            item.add_marker(pytest.mark.skip(reason=f"needs >= {need} CUDA GPUs (found {count})"))


@pytest.fixture(scope="session")
def rank_pool():
    """Factory ``get(world_size, backend='gloo') -> RankPool``.

    Pools are created lazily, cached per ``(world_size, backend)`` for the
    whole session and closed at session end.  ``backend='nccl'`` skips the
    test when fewer than ``world_size`` CUDA devices are visible (or shared, see ``SHARE_GPU``).
    """
    pools: dict = {}

    def get(world_size: int, backend: str = "gloo") -> RankPool:
        key = (world_size, backend)
        pool = pools.get(key)
        if pool is None:
            if "nccl" in backend and _cuda_device_count() < world_size:
                pytest.skip(f"nccl pool of {world_size} ranks needs {world_size} CUDA GPUs")
            real = backend
            if "nccl" in backend and _real_cuda_device_count() < world_size:
                real = "cpu:gloo,cuda:gloo"  # DEEP_EP_TEST_SHARE_GPU: ranks share a GPU
            pool = pools[key] = RankPool(world_size, backend=real)
        return pool

    yield get
    close_pools(pools.values())
