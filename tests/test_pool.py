"""Tests of the multi-rank test harness (tests/_pool.py) itself."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests._pool import WORKER_CACHE, RankCrashError, RankError, RankTimeoutError

# --------------------------------------------------------------------------- #
# Functions run on the ranks (module level: pickled by reference).
# --------------------------------------------------------------------------- #


def _all_reduce_rank(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return {
        "rank": rank,
        "dist_rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "sum": t.item(),
        "pid": os.getpid(),
        "threads": torch.get_num_threads(),
        "env_rank": os.environ.get("RANK"),
    }


def _echo(rank, world_size, a, b=0, *, scale=1):
    return (rank, world_size, (a + b) * scale)


def _tensor_roundtrip(rank, world_size, x):
    gathered = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(gathered, x + rank)
    return torch.stack(gathered)


def _raise_on(rank, world_size, bad_ranks):
    if rank in bad_ranks:
        value = rank * 10
        assert value == -1, f"deliberate failure on rank {rank}"
    return rank


def _sleep_on(rank, world_size, slow_rank, seconds):
    if rank == slow_rank:
        time.sleep(seconds)
    return rank


def _exit_on(rank, world_size, bad_rank, code):
    if rank == bad_rank:
        os._exit(code)
    return rank


def _exit_while_others_in_collective(rank, world_size, bad_rank):
    if rank == bad_rank:
        os._exit(5)
    t = torch.ones(1)
    dist.all_reduce(t)  # blocks forever: bad_rank never joins
    return t.item()


def _raise_while_others_in_collective(rank, world_size, bad_rank):
    if rank == bad_rank:
        raise ValueError(f"rank {rank} bails out before the collective")
    t = torch.ones(1)
    dist.all_reduce(t)
    return t.item()


def _segfault_on(rank, world_size, bad_rank):
    if rank == bad_rank:
        import ctypes

        ctypes.string_at(0)  # SIGSEGV
    return rank


def _cache_put(rank, world_size, key):
    WORKER_CACHE[key] = (rank, os.getpid())
    return rank


def _cache_get(rank, world_size, key):
    return WORKER_CACHE.get(key)


def _noop(rank, world_size):
    return rank


#: the pool's NCCL tests need one GPU per rank (DEEP_EP_TEST_SHARE_GPU pools are gloo on a shared GPU)
_two_real_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs 2 real GPUs (an NCCL pool, not a shared-GPU one)",
)


def _nccl_all_reduce(rank, world_size):
    assert torch.cuda.current_device() == rank
    t = torch.full((4,), float(rank + 1), device=f"cuda:{rank}")
    dist.all_reduce(t)
    return t  # moved to CPU by the pool


def _nccl_raise_while_others_in_collective(rank, world_size):
    if rank == world_size - 1:
        raise ValueError("last rank skips the NCCL all_reduce")
    t = torch.ones(1, device=f"cuda:{rank}")
    dist.all_reduce(t)
    torch.cuda.synchronize()
    return t.item()


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_results_in_rank_order(rank_pool, world_size):
    pool = rank_pool(world_size)
    out = pool.run(_all_reduce_rank)
    assert [o["rank"] for o in out] == list(range(world_size))
    assert [o["dist_rank"] for o in out] == list(range(world_size))
    assert {o["world_size"] for o in out} == {world_size}
    assert {o["sum"] for o in out} == {world_size * (world_size - 1) / 2}
    assert len({o["pid"] for o in out}) == world_size
    assert {o["threads"] for o in out} == {1}
    assert [o["env_rank"] for o in out] == [str(r) for r in range(world_size)]


def test_pool_is_persistent(rank_pool):
    pool = rank_pool(2)
    pids = [o["pid"] for o in pool.run(_all_reduce_rank)]
    assert [o["pid"] for o in pool.run(_all_reduce_rank)] == pids


def test_args_kwargs(rank_pool):
    assert rank_pool(2).run(_echo, 3, b=4, scale=2) == [(0, 2, 14), (1, 2, 14)]


def test_tensor_args_and_results(rank_pool):
    x = torch.arange(3.0)
    out = rank_pool(3).run(_tensor_roundtrip, x)
    expected = torch.stack([x + r for r in range(3)])
    for r in range(3):
        assert torch.equal(out[r], expected)


def test_exception_on_one_rank(rank_pool):
    pool = rank_pool(3)
    with pytest.raises(RankError) as info:
        pool.run(_raise_on, [1])
    msg = str(info.value)
    assert "failed on rank(s) [1]" in msg
    assert "===== rank 1 traceback =====" in msg
    assert "rank 0 traceback" not in msg and "rank 2 traceback" not in msg
    assert "deliberate failure on rank 1" in msg
    assert "test_pool.py" in msg and "in _raise_on" in msg
    assert "assert 10 == -1" in msg  # pytest-style assertion rewriting in the worker
    assert isinstance(info.value, AssertionError) and isinstance(info.value, RuntimeError)
    assert set(info.value.failures) == {1}
    assert info.value.results == [0, None, 2]
    # Same processes, group still usable.
    assert [o["sum"] for o in pool.run(_all_reduce_rank)] == [3.0] * 3


def test_exception_on_every_rank(rank_pool):
    pool = rank_pool(2)
    with pytest.raises(RankError) as info:
        pool.run(_raise_on, [0, 1])
    msg = str(info.value)
    assert "deliberate failure on rank 0" in msg and "deliberate failure on rank 1" in msg
    assert pool.run(_noop) == [0, 1]


def test_exception_while_others_block_in_collective(rank_pool):
    pool = rank_pool(2)
    pool.failure_grace, grace = 0.5, pool.failure_grace
    try:
        t0 = time.monotonic()
        with pytest.raises(RankError) as info:
            pool.run(_raise_while_others_in_collective, 1, timeout=60)
        assert time.monotonic() - t0 < 10
    finally:
        pool.failure_grace = grace
    msg = str(info.value)
    assert "bails out before the collective" in msg
    assert info.value.unfinished == [0]
    assert "rank 0 stack (did not finish)" in msg and "_raise_while_others_in_collective" in msg
    assert pool.run(_noop) == [0, 1]
    assert [o["sum"] for o in pool.run(_all_reduce_rank)] == [1.0, 1.0]


def test_hang_times_out_and_pool_recovers(rank_pool):
    pool = rank_pool(3)
    generation = pool.generation
    t0 = time.monotonic()
    with pytest.raises(RankTimeoutError) as info:
        pool.run(_sleep_on, 1, 30, timeout=1)
    elapsed = time.monotonic() - t0
    assert 1 <= elapsed < 5
    msg = str(info.value)
    assert "timed out after 1s" in msg and "rank(s) [1] did not finish" in msg
    assert "time.sleep" in msg or "_sleep_on" in msg  # faulthandler stack of the stuck rank
    assert info.value.unfinished == [1]
    out = pool.run(_all_reduce_rank)
    assert [o["sum"] for o in out] == [3.0] * 3
    assert pool.generation == generation + 1


def test_worker_exit_detected_and_pool_recovers(rank_pool):
    pool = rank_pool(2)
    t0 = time.monotonic()
    with pytest.raises(RankCrashError) as info:
        pool.run(_exit_on, 1, 3, timeout=60)
    assert time.monotonic() - t0 < 5  # detected without waiting for the timeout
    msg = str(info.value)
    assert "rank 1 worker process died (exit code 3)" in msg
    assert info.value.crashed == {1: 3}
    assert [o["sum"] for o in pool.run(_all_reduce_rank)] == [1.0, 1.0]


def test_worker_exit_while_others_block_in_collective(rank_pool):
    pool = rank_pool(3)
    pool.failure_grace, grace = 0.5, pool.failure_grace
    try:
        t0 = time.monotonic()
        with pytest.raises(RankCrashError) as info:
            pool.run(_exit_while_others_in_collective, 2, timeout=60)
        assert time.monotonic() - t0 < 10
    finally:
        pool.failure_grace = grace
    assert info.value.crashed == {2: 5}
    # Survivors either notice the dead peer (gloo: "Connection closed by
    # peer") or stay blocked and are reported with their stacks.
    assert set(info.value.unfinished) | set(info.value.failures) == {0, 1}
    assert "rank 2 worker process died (exit code 5)" in str(info.value)
    assert [o["sum"] for o in pool.run(_all_reduce_rank)] == [3.0] * 3


def test_segfault_reported_with_stack(rank_pool):
    pool = rank_pool(2)
    with pytest.raises(RankCrashError) as info:
        pool.run(_segfault_on, 0, timeout=60)
    msg = str(info.value)
    assert "rank 0 worker process died (killed by signal SIGSEGV)" in msg
    assert "Segmentation fault" in msg and "_segfault_on" in msg
    assert pool.run(_noop) == [0, 1]


def test_worker_cache_persists_across_runs(rank_pool):
    pool = rank_pool(2)
    pool.run(_cache_put, "test_worker_cache")
    out = pool.run(_cache_get, "test_worker_cache")
    assert [o[0] for o in out] == [0, 1]
    assert [o[1] for o in out] == pool.pids


def test_non_module_level_function_rejected(rank_pool):
    pool = rank_pool(1)

    def local(rank, world_size):
        return rank

    with pytest.raises(TypeError, match="module-level"):
        pool.run(local)
    with pytest.raises(TypeError, match="module-level"):
        pool.run(lambda rank, world_size: rank)
    assert pool.run(_noop) == [0]


def test_run_overhead_is_small(rank_pool):
    pool = rank_pool(4)
    pool.run(_noop)
    n = 50
    t0 = time.perf_counter()
    for _ in range(n):
        pool.run(_noop)
    per_call = (time.perf_counter() - t0) / n
    assert per_call < 0.05, f"{per_call * 1e3:.1f} ms per run"


@pytest.mark.gpu
@_two_real_gpus
def test_nccl_all_reduce(rank_pool):
    pool = rank_pool(2, backend="nccl")
    out = pool.run(_nccl_all_reduce)
    for t in out:
        assert t.device.type == "cpu"
        torch.testing.assert_close(t, torch.full((4,), 3.0))


@pytest.mark.gpu
@_two_real_gpus
def test_nccl_failure_recovers(rank_pool):
    pool = rank_pool(2, backend="nccl")
    pool.failure_grace, grace = 1.0, pool.failure_grace
    try:
        with pytest.raises(RankError, match="skips the NCCL all_reduce"):
            pool.run(_nccl_raise_while_others_in_collective, timeout=60)
    finally:
        pool.failure_grace = grace
    out = pool.run(_nccl_all_reduce)
    torch.testing.assert_close(out[1], torch.full((4,), 3.0))
