"""The nvlink transport's fused path (``DEEP_EP_NVLINK_PATH=fused``) on CPU ranks: the shared-memory emulation
of symmetric memory with the Triton kernels under the interpreter, one process per rank, so the notify /
data / combine kernels' flags written by one process are seen by the others (the GPU protocol itself).

- conformance against the reference (every scenario, 2 and 3 ranks), consecutive calls of every kind
  (the epoch protocol across both areas), a rank that does not come (the kernels' bounded wait);
- the per-call budget: a fresh dispatch (``get_dispatch_layout`` + ``dispatch``) is at most 3 kernel
  launches with no other device op, no blocking copy and no host read of a device tensor; a combine and
  a cached dispatch one launch each. The host path (today's default) is measured by the same counter and
  exceeds it.
"""

from __future__ import annotations

import os
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deep_ep.transport.nvlink.fused import FusedPath
from tests import _interpret
from tests._cases import get_buffer, make_case
from tests.test_conformance import SCENARIOS, run_reuse_shapes, run_scenario

#: the CPU tests: the fused path's kernels need the interpreter here (``gpu`` tests run the same functions)
interpreted = pytest.mark.skipif(not _interpret.enabled(), reason="the fused path's kernels need the interpreter")

FUSED_SCENARIOS = [
    "basic",
    "no_weights",
    "no_topk",
    "fp8",
    "worst",
    "worst_on_rank0_only",
    "bias2",
    "one_expert",
    "all_neg",
    "empty_rank",
    "odd_hidden_7",
    "nan",
    "fp32",
    "empty_tokens",
    "topk1",
    "small_staging",  # rows that do not fit an area: the host path, between barriers
]


@interpreted
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", FUSED_SCENARIOS)
def test_fused_conformance(rank_pool, world, name):
    seed = zlib.crc32(f"{name}/{world}/fused".encode())
    rank_pool(world).run(run_scenario, "nvlink-fused", seed, SCENARIOS[name])


def rank_consecutive(rank, R):
    """Many calls of every kind in a row (fresh, cached, combine, num_worst_tokens, shapes changing), so
    the epochs cross both areas many times; every output checked."""
    run_reuse_shapes(rank, R, "nvlink-fused", 5)
    for i, name in enumerate(["worst", "basic", "fp8", "no_topk", "worst", "bias1"]):
        run_scenario(rank, R, "nvlink-fused", 40 + i, SCENARIOS[name])
    return True


@interpreted
def test_fused_consecutive_calls(rank_pool):
    rank_pool(2).run(rank_consecutive)


def rank_missing_peer(rank, R, timeout_s):
    """Rank 1 makes no call: rank 0's notify kernel gives up after its bounded wait and the host raises
    naming rank 1, within timeout_s and a constant."""
    import torch.distributed as dist

    from deep_ep.errors import DeepEPTimeoutError
    from tests._cases import device

    g = dist.new_group(list(range(R)))
    env = dict(DEEP_EP_NVLINK_PATH="fused", DEEP_EP_KERNELS_ON_CPU="1")
    if device().type == "cpu":
        env["DEEP_EP_NVLINK_EMULATE"] = "1"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import deep_ep

        buf = deep_ep.Buffer(g, backend="nvlink", timeout_s=timeout_s)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    case = make_case(3, R, num_experts=4, hidden=16, topk=2, tokens=[5, 5])
    idx = case.topk_idx[rank].to(device())
    per_rank, _, pe, in_rank, _ = buf.get_dispatch_layout(idx, 4)
    if rank == 1:
        time.sleep(timeout_s + 2.0)
        return None
    t0 = time.monotonic()
    with pytest.raises(DeepEPTimeoutError, match=r"rank\(s\) \[1\] did not arrive"):
        buf.dispatch(
            case.xs[rank].to(device()),
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=pe,
            topk_idx=idx,
        )
    return time.monotonic() - t0


@interpreted
def test_fused_missing_peer_times_out(tmp_path):
    from tests._pool import RankPool, close_pools

    pool = RankPool(2, backend="gloo")
    try:
        took = pool.run(rank_missing_peer, 1.5, timeout=60)[0]
    finally:
        close_pools([pool])
    assert took < 1.5 + 4.0, took


# ---------------------------------------------------------------------------------------------- the budget
#: aten ops that launch no device work (views, metadata, allocations)
_FREE = {
    "aten.view.default",
    "aten._unsafe_view.default",
    "aten.as_strided.default",
    "aten.slice.Tensor",
    "aten.select.int",
    "aten.t.default",
    "aten.transpose.int",
    "aten.expand.default",
    "aten.unsqueeze.default",
    "aten.squeeze.dim",
    "aten.alias.default",
    "aten.detach.default",
    "aten.permute.default",
    "aten.empty.memory_format",
    "aten.empty_strided.default",
    "aten.view.dtype",
    "aten._reshape_alias.default",
    "aten.reshape.default",
    "aten.split.Tensor",
    "aten.split_with_sizes.default",
    "aten.unbind.int",
    "aten.diagonal.default",
    "aten.lift_fresh.default",
}
#: aten ops that read a device tensor on the host (a sync on a GPU); host data made into a tensor *on a
#: device* (``torch.tensor(..., device=...)``, a blocking copy on a GPU) is caught by wrapping the factories
_SYNC = {"aten._local_scalar_dense.default", "aten.equal.default"}


class _Budget(TorchDispatchMode):
    """Counts, inside a region: Triton launches, aten ops that launch device work, host reads of tensors
    (``item``, ``tolist``, ``cpu``, ``numpy``, ``bool`` / ``int`` / ``float`` of a tensor) and copies of host
    data into tensors."""

    _METHODS = ("tolist", "cpu", "numpy", "item", "__bool__", "__int__", "__float__")

    def __enter__(self):
        from deep_ep.kernels.launch import STATS

        self.ops, self.syncs, self.reads = [], [], []
        STATS.reset()
        self._saved = {m: getattr(torch.Tensor, m) for m in self._METHODS}
        budget = self

        def wrap(name, fn):
            def counted(t, *a, **k):
                if not STATS.interpreting_now:
                    budget.reads.append(name)
                return fn(t, *a, **k)

            return counted

        for m, fn in self._saved.items():
            setattr(torch.Tensor, m, wrap(m, fn))
        self._factories = {f: getattr(torch, f) for f in ("tensor", "as_tensor")}

        def onto_device(name, fn):
            def counted(*a, **k):
                if k.get("device") is not None:
                    budget.syncs.append(f"torch.{name}(..., device=...)")
                return fn(*a, **k)

            return counted

        for f, fn in self._factories.items():
            setattr(torch, f, onto_device(f, fn))
        return super().__enter__()

    def __exit__(self, *exc):
        from deep_ep.kernels.launch import STATS

        for m, fn in self._saved.items():
            setattr(torch.Tensor, m, fn)
        for f, fn in self._factories.items():
            setattr(torch, f, fn)
        self.launches = STATS.launches
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in _SYNC:
            self.syncs.append(name)
        elif name not in _FREE:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))

    def work(self) -> int:
        """Device work items: launches plus ops that would launch a kernel on a GPU."""
        return self.launches + len(self.ops)


def rank_budget(rank, R, path):
    buf = get_buffer("nvlink-fused" if path == "fused" else "nvlink-host")
    E = 8
    case = make_case(21, R, num_experts=E, hidden=64, topk=2, tokens=[12, 9, 7][:R])
    x, idx, w = case.xs[rank], case.topk_idx[rank], case.topk_weights[rank]
    os.environ["DEEP_EP_KERNELS_ON_CPU"] = "1"  # the layout kernel too, as on a GPU
    try:
        out = {}
        for _rep in range(2):  # the second round is measured (the first compiles nothing here, but warms)
            with _Budget() as b:
                per_rank, _, pe, in_rank, _ = buf.get_dispatch_layout(idx, E)
                rx, ri, rw, _, h, _ = buf.dispatch(
                    x,
                    num_tokens_per_rank=per_rank,
                    is_token_in_rank=in_rank,
                    num_tokens_per_expert=pe,
                    topk_idx=idx,
                    topk_weights=w,
                )
            out["fresh"] = (b.work(), b.launches, b.ops, b.syncs, b.reads)
            with _Budget() as b:
                buf.combine(rx, h, topk_weights=rw)
            out["combine"] = (b.work(), b.launches, b.ops, b.syncs, b.reads)
            with _Budget() as b:
                buf.dispatch(x, handle=h)
            out["cached"] = (b.work(), b.launches, b.ops, b.syncs, b.reads)
        return out
    finally:
        del os.environ["DEEP_EP_KERNELS_ON_CPU"]


def rank_layout_lane(rank, R):
    """get_dispatch_layout validated once per signature: a same-signature call runs the kernel on its own
    values; a changed signature is validated again (and refused if bad); the kernel switch is read per call."""
    from deep_ep import DeepEPInputError, DeepEPTypeError, layout

    buf = get_buffer("nvlink-fused")
    E, T, K = 4 * R, 10, 2
    os.environ["DEEP_EP_KERNELS_ON_CPU"] = "1"
    try:
        for seed in range(3):
            g = torch.Generator().manual_seed(seed * 7 + rank)
            idx = torch.rand(T, E, generator=g).topk(K, dim=1).indices
            idx[seed, 0] = -1
            got = buf.get_dispatch_layout(idx, E)
            want = layout.dispatch_layout_torch(idx, E, R)
            for a, b in zip([got[0], got[2], got[3]], [want[0], want[2], want[3]]):
                assert torch.equal(a, b), (seed, a, b)
        assert len(buf._layouts) == 1
        wide = torch.cat([idx, idx], dim=1)
        for _ in range(2):  # not contiguous: validated (and made contiguous) every time, right results
            got = buf.get_dispatch_layout(wide[:, :K], E)
            assert torch.equal(got[3], layout.dispatch_layout_torch(idx, E, R)[3])
        assert len(buf._layouts) == 1
        with pytest.raises(DeepEPTypeError, match="int64"):
            buf.get_dispatch_layout(idx.int(), E)
        with pytest.raises(DeepEPInputError, match="divisible"):
            buf.get_dispatch_layout(idx, E + 1)
        bad = idx.clone()
        bad[0, 0] = E  # out of range: the kernel drops it; the torch path (kernels off) refuses it
        buf.get_dispatch_layout(bad, E)
        os.environ["DEEP_EP_DISABLE_TRITON"] = "1"
        with pytest.raises(DeepEPInputError, match="topk_idx"):
            buf.get_dispatch_layout(bad, E)
        return True
    finally:
        os.environ.pop("DEEP_EP_KERNELS_ON_CPU", None)
        os.environ.pop("DEEP_EP_DISABLE_TRITON", None)


@interpreted
def test_layout_validated_once_per_signature(rank_pool):
    rank_pool(2).run(rank_layout_lane)


def rank_lane(rank, R):
    """A fresh dispatch whose signature was parsed before runs the Buffer's fused lane: its outputs, handle
    (combine, cached dispatch) and errors are the general path's (the same call with a ``config``, which the
    lane does not take), for host-known and num_worst_tokens calls, and after bad input on one rank."""
    import deep_ep
    from deep_ep import DeepEPInputError, RemoteInputError
    from tests._cases import device

    dev = device()
    buf = get_buffer("nvlink-fused")
    E, T, H, K = 4 * R, 7, 40, 2
    cfg = deep_ep.Config(buf.num_sms)
    lanes = []
    original = buf._fused_fresh
    buf._fused_fresh = lambda *a: lanes.append(1) or original(*a)
    os.environ["DEEP_EP_KERNELS_ON_CPU"] = "1"
    try:

        def inputs(seed, bad=False):
            g = torch.Generator().manual_seed(seed * 31 + rank)
            x = torch.randn(T, H, generator=g).to(torch.bfloat16)
            idx = torch.rand(T, E, generator=g).topk(K, dim=1).indices
            idx[seed % T, 1] = -1
            if bad:
                idx[0, 0] = E + 3
            return x.to(dev), idx.to(dev), torch.rand(T, K, generator=g).to(dev)

        def fresh(x, idx, w, **kw):
            _, _, pe, in_rank, _ = buf.get_dispatch_layout(idx, E)
            return buf.dispatch(
                x, is_token_in_rank=in_rank, num_tokens_per_expert=pe, topk_idx=idx, topk_weights=w, **kw
            )

        for worst in (0, R * T):
            for seed in range(3):
                x, idx, w = inputs(seed)
                before = len(lanes)
                got = fresh(x, idx, w, num_worst_tokens=worst)
                want = fresh(x, idx, w, num_worst_tokens=worst, config=cfg)
                assert len(lanes) == before + (seed > 0), (worst, seed)  # the first call of a signature parses
                for a, b in zip(got[:3], want[:3]):
                    assert torch.equal(a, b), (worst, seed)
                assert got[3] == want[3]
                assert torch.equal(got[4][0], want[4][0]) and got[4][2] == want[4][2]
                y = got[0].float().mul(1.5).to(torch.bfloat16)
                c_got = buf.combine(y, got[4], topk_weights=got[2])
                c_want = buf.combine(y, want[4], topk_weights=want[2])
                assert torch.equal(c_got[0], c_want[0]) and torch.equal(c_got[1], c_want[1])
                assert torch.equal(buf.dispatch(x * 2, handle=got[4])[0], buf.dispatch(x * 2, handle=want[4])[0])
        n = len(lanes)
        x, idx, w = inputs(7, bad=rank == 1)  # the lane's signature, an id out of range on rank 1
        with pytest.raises(DeepEPInputError if rank == 1 else RemoteInputError, match=f"{E + 3}" if rank else "rank 1"):
            fresh(x, idx, w)
        assert len(lanes) == n + 1
        x, idx, w = inputs(8)  # and the Buffer works on
        got, want = fresh(x, idx, w), fresh(x, idx, w, config=cfg)
        assert torch.equal(got[0], want[0])
        return True
    finally:
        os.environ.pop("DEEP_EP_KERNELS_ON_CPU", None)
        buf._fused_fresh = original


@interpreted
def test_fused_lane_matches_the_general_path(rank_pool):
    rank_pool(2).run(rank_lane, timeout=240)


@pytest.mark.gpu
def test_fused_lane_matches_the_general_path_gpu(rank_pool):
    rank_pool(2, backend="nccl").run(rank_lane, timeout=240)


@interpreted
def test_fused_path_meets_the_per_call_budget(rank_pool):
    """Fresh dispatch <= 3 launches and nothing else on the device, no blocking copy, no host read of a
    tensor (the one host wait reads pinned memory the notify kernel wrote); combine and cached dispatch
    one launch each."""
    got = rank_pool(2).run(rank_budget, "fused")
    for r, out in enumerate(got):
        work, launches, ops, syncs, reads = out["fresh"]
        assert work <= 3 and launches == 3, f"rank {r} fresh dispatch: {launches} launches, ops {ops}"
        assert not syncs and not reads, f"rank {r} fresh dispatch: syncs {syncs}, host reads {reads}"
        for call in ("combine", "cached"):
            work, launches, ops, syncs, reads = out[call]
            assert work <= 2 and launches == 1, f"rank {r} {call}: {launches} launches, ops {ops}"
            assert not syncs and not reads, f"rank {r} {call}: syncs {syncs}, host reads {reads}"


@interpreted
def test_host_path_exceeds_the_per_call_budget(rank_pool):
    """The same counter on the host path (today's default): the budget test fails on it."""
    got = rank_pool(2).run(rank_budget, "host")
    for out in got:
        work, launches, ops, syncs, reads = out["fresh"]
        assert work > 3 and (syncs or reads), out["fresh"]
        for call in ("fresh", "combine", "cached"):  # its host numbers reach the device without a blocking copy
            assert not [s for s in out[call][3] if s.startswith("torch.")], (call, out[call][3])


# ---------------------------------------------------------------------------------------------- the count spin
class _SpinHost:
    """The parts of a FusedPath that :meth:`FusedPath._spin` uses, with a pinned-like ring of numpy words."""

    def __init__(self, timeout_s):
        from deep_ep.errors import DeepEPTimeoutError
        from deep_ep.transport.nvlink import fused as nf

        self.rank, self.num_ranks, self.timeout_s, self._spin_grace_s = 0, 4, timeout_s, 0.3
        self._ring_np = np.zeros(((nf._SLOTS + 1) * (nf._IN_W + nf._OUT_W),), dtype=np.int64)

        class _Waiter:
            seq = 0
            broken = None

            def fail(self, stage, waited):
                raise DeepEPTimeoutError(f"waited {waited:.2f}s in {stage}")

        self.waiter = _Waiter()

    _in = FusedPath._in
    _out = FusedPath._out
    _spin = FusedPath._spin


def test_count_spin_returns_when_the_kernel_writes_late():
    """A thread standing in for the notify kernel writes the block 0.2 s late: the spin returns it."""
    host = _SpinHost(timeout_s=5.0)
    out = host._out(3)

    def kernel():
        time.sleep(0.2)
        out[3] = 17  # the receive count, then the ticket (the kernel's release order)
        out[0] = 9

    th = threading.Thread(target=kernel)
    th.start()
    got = host._spin(3, 9, seq=1)
    th.join()
    assert int(got[3]) == 17


def test_count_spin_times_out_when_nothing_writes():
    """Nothing ever writes the block (a kernel that never ran): the spin raises after timeout_s + grace,
    sleeping rather than burning a core (it spins most of the wait in time.sleep)."""
    from deep_ep.errors import DeepEPTimeoutError

    host = _SpinHost(timeout_s=0.4)
    t0, c0 = time.monotonic(), time.process_time()
    with pytest.raises(DeepEPTimeoutError, match="fused notify"):
        host._spin(0, 5, seq=2)
    wall, cpu = time.monotonic() - t0, time.process_time() - c0
    assert 0.4 + 0.3 <= wall < 0.4 + 0.3 + 2.0, wall
    assert cpu < 0.8 * wall, (cpu, wall)


def test_count_spin_names_the_ranks_the_kernel_missed():
    """The kernel gave up (status 1) with ranks 1 and 3 missing: the error names them."""
    from deep_ep.errors import DeepEPTimeoutError

    host = _SpinHost(timeout_s=5.0)
    out = host._out(1)
    out[1], out[2], out[0] = 1, (1 << 1) | (1 << 3), 4
    with pytest.raises(DeepEPTimeoutError, match=r"rank\(s\) \[1, 3\] did not arrive"):
        host._spin(1, 4, seq=3)
    assert host.waiter.broken


def rank_interleaved(rank, R):
    """Compressed calls (the host path) and plain ones (the fused kernels) in turns, on two live handles:
    the data areas change hands between the paths (barriers on both sides) and every output matches the
    reference; the fused kernels did run."""
    from deep_ep import reference as ref
    from deep_ep.compress import make_codec
    from deep_ep.kernels.launch import STATS
    from tests._cases import assert_same, device

    buf = get_buffer("nvlink-fused")
    E = 8
    dev = device()
    case = make_case(77, R, hidden=96, topk=3, num_experts=E, tokens=[13, 9, 11][:R])
    idx, w, x = case.topk_idx[rank].to(dev), case.topk_weights[rank].to(dev), case.xs[rank].to(dev)
    exp = ref.dispatch(case.xs, case.topk_idx, E, case.topk_weights)
    n = exp[rank].num_recv_tokens
    c8 = make_codec(8, case.hidden)
    ys = [e.recv_x * (r + 2) for r, e in enumerate(exp)]
    want_c = ref.combine(ys, exp, case.tokens)[rank][0]
    want_c8 = ref.combine([c8.roundtrip(y) for y in ys], exp, case.tokens)[rank][0]
    STATS.reset()

    def fresh(compress):
        _, _, pe, in_rank, _ = buf.get_dispatch_layout(idx, E)
        return buf.dispatch(
            x, is_token_in_rank=in_rank, num_tokens_per_expert=pe, topk_idx=idx, topk_weights=w, compress=compress
        )

    a = fresh(None)  # fused
    fused_launches = STATS.launches
    b = fresh(8)  # host path (a compressed fresh dispatch)
    want_x8 = ref.dispatch([c8.roundtrip(t) for t in case.xs], case.topk_idx, E)[rank].recv_x[:n]
    assert_same(b[0][:n].cpu(), want_x8, "compressed fresh")
    assert_same(buf.dispatch(x, handle=a[4])[0][:n].cpu(), exp[rank].recv_x[:n], "fused cached after host")
    assert_same(buf.combine(a[0] * (rank + 2), a[4], compress=8)[0].cpu(), want_c8, "host combine of a fused plan")
    assert_same(buf.combine(a[0] * (rank + 2), a[4])[0].cpu(), want_c, "fused combine after host")
    assert_same(buf.combine(a[0] * (rank + 2), b[4])[0].cpu(), want_c, "combine of the host plan")
    c = fresh(None)
    assert_same(c[0][:n].cpu(), exp[rank].recv_x[:n], "fused fresh after host")
    assert_same(buf.combine(c[0] * (rank + 2), c[4])[0].cpu(), want_c, "fused combine")
    return fused_launches, STATS.launches, int(dev.type == "cuda")


@interpreted
def test_fused_interleaved_with_host_path_calls(rank_pool):
    check_interleaved(rank_pool(2).run(rank_interleaved))


def check_interleaved(got):
    for first, total, lay in got:
        # notify + data kernel per fused fresh dispatch (+ the layout kernel on a GPU; in torch on CPU), one
        # per fused cached dispatch / combine, none on the host path (its layout kernel on a GPU)
        assert (first, total) == (2 + lay, 2 + lay + lay + 1 + 1 + 2 + lay + 1), (first, total, lay)


@interpreted
@pytest.mark.parametrize("what", ["expert_id", "weights_shape"])
def test_fused_bad_input_on_one_rank(rank_pool, what):
    """The notify kernel's verdict: the rank with bad input raises its own error, the other names it."""
    from tests.test_errors import rank_bad_input_one_rank

    rank_pool(2).run(rank_bad_input_one_rank, what, "nvlink-fused", timeout=90)


@interpreted
@pytest.mark.parametrize("what", ["num_experts", "hidden"])
def test_fused_ranks_disagree(rank_pool, what):
    from tests.test_errors import rank_disagree

    rank_pool(2).run(rank_disagree, what, "nvlink-fused", timeout=90)


def rank_worst_too_small_deferred(rank, R):
    """A ``num_worst_tokens`` dispatch never waits for the host, so a num_worst_tokens too small on rank 0 is
    reported at every rank's next call; the dispatch itself writes nothing out of bounds (the rows past
    it are dropped, the rest arrive), and the Buffer works afterwards."""
    from deep_ep.errors import DeepEPInputError
    from tests._cases import device
    from tests.test_errors import _expect, _layout

    dev = device()
    buf = get_buffer("nvlink-fused")
    E, T = 8, 6
    idx = torch.arange(E, device=dev).repeat(T, 1)[:, :4]  # every token to rank 0 (and 1 if R == 2)
    x = torch.randn((T, 16), device=dev).to(torch.bfloat16)
    lay = _layout(buf, idx, E)
    worst = 2 if rank == 0 else 100
    out = buf.dispatch(x, num_worst_tokens=worst, **lay)
    assert out[0].shape[0] == worst
    _expect(DeepEPInputError, lambda: buf.get_dispatch_layout(idx, E), "num_worst_tokens")
    run_scenario(rank, R, "nvlink-fused", 8, {})
    return True


@interpreted
def test_fused_worst_too_small(rank_pool):
    rank_pool(2).run(rank_worst_too_small_deferred, timeout=90)


# ---------------------------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("name", FUSED_SCENARIOS)
def test_fused_conformance_gpu(rank_pool, name):
    seed = zlib.crc32(f"{name}/gpu/fused".encode())
    rank_pool(2, backend="nccl").run(run_scenario, "nvlink-fused", seed, SCENARIOS[name])


@pytest.mark.gpu
def test_fused_consecutive_and_interleaved_gpu(rank_pool):
    pool = rank_pool(2, backend="nccl")
    pool.run(rank_consecutive)
    check_interleaved(pool.run(rank_interleaved))


@pytest.mark.gpu
def test_fused_budget_gpu(rank_pool):
    """The per-call budget on a GPU (the layout kernel, the notify and the data kernel; nothing else)."""
    pool = rank_pool(2, backend="nccl")
    for r, out in enumerate(pool.run(rank_budget, "fused")):
        work, launches, ops, syncs, reads = out["fresh"]
        assert launches == 3 and work <= 3 and not syncs and not reads, (r, out["fresh"])
        for call in ("combine", "cached"):
            work, launches, ops, syncs, reads = out[call]
            assert launches == 1 and work <= 2 and not syncs and not reads, (r, call, out[call])


@pytest.mark.gpu
def test_fused_missing_peer_times_out_gpu(rank_pool):
    """The notify kernel's bounded wait on the GPU clock ends, and the host names the missing rank."""
    took = rank_pool(2, backend="nccl").run(rank_missing_peer, 1.5, timeout=90)[0]
    assert took < 1.5 + 4.0, took
