"""The fault matrix: for every collective entry point, a bad argument on one rank, a peer that exits, a peer
that stalls past ``timeout_s``. Every surviving rank must raise a ``DeepEPError`` naming the rank within
``timeout_s`` + a small constant, no process may be killed by a signal, and a fresh Buffer must work
afterwards. Also: calls made in a different order on two ranks (handles, Buffers) and low-latency settings
that differ between ranks raise instead of mixing rows; messages name ranks, dtypes and levels.

The matrix runs in its own 2-rank pool (a stall or an exit leaves a process group out of step; the shared
pools stay clean), each scenario on a fresh process group. Outcomes are written to files, so the survivor's
is read even when the pool reports the victim's exit.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.distributed as dist

import deep_ep
from deep_ep import reference as ref
from deep_ep.errors import DeepEPError, DeepEPTimeoutError, RankMismatchError, RemoteInputError
from tests._cases import assert_same, get_buffer, make_case
from tests._pool import RankCrashError, RankError, RankPool, close_pools

TIMEOUT = 1.0  # timeout_s of the matrix's Buffers
SLACK = 1.5  # what "within timeout_s + a small constant" allows (process scheduling on a busy 2-core machine)
VICTIM = 1
APIS = ["dispatch", "cached", "combine", "ll_dispatch", "ll_combine", "sparse", "moe", "hf"]
FAULTS = ["bad", "stall", "exit"]


@pytest.fixture(scope="module")
def fault_pool():
    pool = RankPool(2, backend="gloo", failure_grace=30.0)
    yield pool
    close_pools([pool])


# ---------------------------------------------------------------------------------------------- the calls
def _setup(api, group, rank, R):
    """Make the entry point ready (valid collective steps first) and return ``call(bad)``."""
    os.environ["DEEP_EP_TIMEOUT_S"] = str(TIMEOUT)  # (patch_moe_model's own Buffer reads it)
    E, H, K = 4 * R, 64, 2
    case = make_case(7, R, num_experts=E, hidden=H, topk=K, tokens=[9, 6])
    x, idx, w = case.xs[rank], case.topk_idx[rank], case.topk_weights[rank]
    if api == "hf":
        from transformers import AutoModelForCausalLM

        from deep_ep.integrations import patch_moe_model
        from deep_ep.integrations.hf_configs import moe_config

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(moe_config("qwen3_moe"), attn_implementation="eager")
        ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(rank))

        def call(bad):
            patch_moe_model(model, num_gpus=3 if bad else None, group=group)
            return model(ids).logits

        return call
    buf = deep_ep.Buffer(group, backend="collective", timeout_s=TIMEOUT)

    def fresh(xx=x):
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
        return buf.dispatch(
            xx,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=idx,
            topk_weights=w,
        )

    if api == "dispatch":
        return lambda bad: fresh(x.to(torch.int32) if bad else x)
    if api in ("cached", "combine"):
        recv_x, _, _, _, h, _ = fresh()
        if api == "cached":
            return lambda bad: buf.dispatch(x[:-1] if bad else x, handle=h)
        return lambda bad: buf.combine(recv_x, h, compress="bogus" if bad else True)
    M = 16
    if api == "ll_dispatch":
        return lambda bad: buf.low_latency_dispatch(torch.cat([x, x, x]) if bad else x, idx, M, E, use_fp8=False)
    if api == "ll_combine":
        recv, _, handle, _, _ = buf.low_latency_dispatch(x, idx, M, E, use_fp8=False)
        return lambda bad: buf.low_latency_combine(recv, idx, w[:, :1] if bad else w, handle)
    if api == "sparse":
        return lambda bad: deep_ep.SparseCollective(idx.float() if bad else idx, buffer=buf)
    if api == "moe":
        layer = deep_ep.ExpertParallelMoE(H, 32, E, K, group=group, buffer=buf)
        return lambda bad: layer(torch.randn(5, H + 1 if bad else H))
    raise AssertionError(api)


def _fresh_buffer_works(rank, R):
    """After a fault, a Buffer on a new group moves rows correctly (the old group may be out of step)."""
    g = dist.new_group(list(range(R)))
    buf = deep_ep.Buffer(g, backend="collective", timeout_s=30.0)
    case = make_case(11, R, num_experts=8, hidden=32, topk=2)
    exp = ref.dispatch(case.xs, case.topk_idx, 8, case.topk_weights)[rank]
    idx = case.topk_idx[rank]
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 8)
    rx, _, _, _, h, _ = buf.dispatch(
        case.xs[rank],
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=idx,
    )
    assert_same(rx, exp.recv_x, "recv_x after the fault")
    buf.combine(rx, h)


def rank_fault(rank, R, api, fault, out_dir):
    group = dist.new_group(list(range(R)))  # every scenario on its own group
    outcome = dict(rank=rank, api=api, fault=fault)
    t0 = time.monotonic()
    try:
        call = _setup(api, group, rank, R)
        t0 = time.monotonic()
        if rank == VICTIM and fault == "exit":
            os._exit(3)
        if rank == VICTIM and fault == "stall":
            time.sleep(TIMEOUT + 1.5)
            outcome.update(kind="stalled")
        else:
            call(fault == "bad" and rank == VICTIM)
            outcome.update(kind="ok")
    except Exception as e:  # noqa: BLE001 - the outcome is what the test checks
        outcome.update(kind=type(e).__name__, message=str(e), deep_ep=isinstance(e, DeepEPError))
    outcome["elapsed"] = time.monotonic() - t0
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(outcome, f)
    if fault != "exit":
        _fresh_buffer_works(rank, R)
    return outcome


#: the pairs the default run covers (every entry point and every fault at least once); the rest of the matrix
#: is marked slow and run by CI's second pytest step (``pytest -m slow``)
DEFAULT_PAIRS = {(a, "bad") for a in APIS if a != "hf"} | {
    ("dispatch", "stall"),
    ("hf", "stall"),
    ("combine", "exit"),
    ("sparse", "exit"),
}
MATRIX = [
    pytest.param(a, f, marks=() if (a, f) in DEFAULT_PAIRS else pytest.mark.slow, id=f"{a}-{f}")
    for a in APIS
    for f in FAULTS
]


@pytest.mark.parametrize("api,fault", MATRIX)
def test_fault_matrix(fault_pool, tmp_path, api, fault):
    """One entry point, one fault: the survivor (rank 0) raises a DeepEPError naming rank 1 in time."""
    out = str(tmp_path)
    crashed = {}
    try:
        fault_pool.run(rank_fault, api, fault, out, timeout=60)
    except RankCrashError as e:
        crashed = e.crashed
    except RankError as e:  # a rank raised outside its recorded outcome (the fresh-Buffer check)
        raise AssertionError(str(e)) from e
    got = {}
    for r in (0, 1):
        p = os.path.join(out, f"{r}.json")
        if os.path.exists(p):
            got[r] = json.load(open(p))
    survivor = got.get(0)
    assert survivor is not None, f"rank 0 recorded nothing (crashed: {crashed})"
    assert survivor["kind"] != "ok", f"rank 0 finished a call that rank 1 {fault}ed: {survivor}"
    assert survivor["deep_ep"], f"rank 0 raised {survivor['kind']}, not a DeepEPError: {survivor['message']}"
    assert "rank 1" in survivor["message"] or "rank(s) 1" in survivor["message"] or "[1]" in survivor["message"], (
        survivor["message"]
    )
    assert survivor["elapsed"] <= TIMEOUT + SLACK, f"rank 0 took {survivor['elapsed']:.2f}s: {survivor}"
    if fault == "exit":
        assert crashed == {1: 3}, f"only rank 1 exits, with its own code (no signal): {crashed}"
    else:
        assert not crashed
    if fault == "bad":
        victim = got[1]
        assert victim["kind"] != "ok" and victim["message"].startswith("rank 1"), victim
        if survivor["kind"] == "RemoteInputError":
            assert survivor["elapsed"] < TIMEOUT, "a bad argument is reported at once, not at the timeout"
    if fault == "stall":
        assert survivor["kind"] == "DeepEPTimeoutError", survivor
        assert survivor["elapsed"] >= TIMEOUT * 0.9, "the timeout fired early"


# ---------------------------------------------------------------------------------------------- call order
def rank_handles_out_of_order(rank, R):
    buf = get_buffer()
    E = 8
    case = make_case(3, R, num_experts=E, hidden=16, topk=2, tokens=[5, 7])
    handles, recvs = [], []
    for scale in (1.0, 2.0):
        idx = case.topk_idx[rank]
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
        rx, _, _, _, h, _ = buf.dispatch(
            case.xs[rank] * scale,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=idx,
        )
        handles.append(h)
        recvs.append(rx)
    order = [0, 1] if rank == 0 else [1, 0]  # rank 1 combines the second dispatch's rows first
    with pytest.raises(RankMismatchError, match="Buffer / handle"):
        buf.combine(recvs[order[0]], handles[order[0]])
    return True


def test_handles_combined_in_a_different_order_raise(rank_pool):
    """Two handles combined in a different order on two ranks: every rank raises (before, wrong rows)."""
    rank_pool(2).run(rank_handles_out_of_order)


def rank_buffers_out_of_order(rank, R):
    a = deep_ep.Buffer(dist.group.WORLD, backend="collective")
    b = deep_ep.Buffer(dist.group.WORLD, backend="collective")
    case = make_case(4, R, num_experts=8, hidden=16, topk=2, tokens=[4, 4])
    idx = case.topk_idx[rank]
    first = a if rank == 0 else b  # the ranks use the two Buffers in a different order
    per_rank, _, per_expert, in_rank, _ = first.get_dispatch_layout(idx, 8)
    with pytest.raises(RankMismatchError, match="Buffer"):
        first.dispatch(
            case.xs[rank],
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=idx,
        )
    return True


def test_buffers_used_in_a_different_order_raise(rank_pool):
    rank_pool(2).run(rank_buffers_out_of_order)


def rank_low_latency_settings_differ(rank, R):
    buf = get_buffer()
    case = make_case(5, R, num_experts=8, hidden=128, topk=2, tokens=[6, 6])
    M = 8 if rank == 0 else 12  # rows would land in another expert's slot
    with pytest.raises(RankMismatchError, match="low-latency settings"):
        buf.low_latency_dispatch(case.xs[rank], case.topk_idx[rank], M, 8, use_fp8=False)
    return True


def test_low_latency_settings_that_differ_raise(rank_pool):
    """num_max_dispatch_tokens_per_rank (and the other sizes) differing between ranks raise on every rank."""
    rank_pool(2).run(rank_low_latency_settings_differ)


# ---------------------------------------------------------------------------------------------- messages
def rank_messages(rank, R):
    buf = get_buffer()
    E = 8
    case = make_case(6, R, num_experts=E, hidden=16, topk=2, tokens=[4, 4])
    idx = case.topk_idx[rank]
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    lay = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    msgs = {}
    # a topk_idx on the wrong device (as a meta tensor) on rank 1: the remote message names topk_idx
    bad_idx = idx.to("meta") if rank == 1 else idx
    try:
        buf.dispatch(case.xs[rank], topk_idx=bad_idx, **lay)
    except DeepEPError as e:
        msgs["device"] = str(e)
    # dtypes differ: named, not coded
    x = case.xs[rank].float() if rank == 1 else case.xs[rank]
    try:
        buf.dispatch(x, topk_idx=idx, **lay)
    except DeepEPError as e:
        msgs["dtype"] = str(e)
    # compression levels differ: named
    try:
        buf.dispatch(case.xs[rank], topk_idx=idx, compress=8 if rank == 0 else 4, **lay)
    except DeepEPError as e:
        msgs["level"] = str(e)
    return msgs


def test_error_messages_name_ranks_arguments_dtypes_and_levels(rank_pool):
    m0, m1 = rank_pool(2).run(rank_messages)
    assert "topk_idx" in m0["device"] and "rank 1" in m0["device"], m0["device"]
    assert m1["device"].startswith("rank 1:") and "meta" in m1["device"], m1["device"]
    for m in (m0, m1):
        assert "bfloat16" in m["dtype"] and "float32" in m["dtype"], m["dtype"]
        assert "8" in m["level"] and "4" in m["level"] and "80" not in m["level"], m["level"]


def test_combine_before_the_receive_hook_raises():
    """A low-latency combine of a kernel-path dispatch whose receive hook has not run raises (its rows have
    not arrived), on the rank that made it; checked before anything is sent."""
    from deep_ep.low_latency import LowLatencyHandle, low_latency_combine

    class Buf:
        num_ranks, rank, num_sms = 1, 0, 20

    h = LowLatencyHandle(None, None, 4, 16, 2, 3, 2, fast={"received": False})
    y = torch.zeros((2, 4, 16), dtype=torch.bfloat16)
    idx = torch.zeros((3, 2), dtype=torch.int64)
    with pytest.raises(deep_ep.DeepEPInputError, match="receive hook has not run"):
        low_latency_combine(Buf(), None, y, idx, torch.zeros((3, 2)), h)


def test_timeout_fires_at_timeout_s():
    """The diagnosis after an expired wait is part of timeout_s (it used to add up to 2 s)."""
    from deep_ep.waiting import Waiter

    class Never:
        def is_completed(self):
            return False

        def wait(self):  # pragma: no cover - never reached
            pass

    w = Waiter.__new__(Waiter)
    w.group, w.rank, w.num_ranks, w.global_ranks, w.prefix, w.timeout_s, w.seq, w.broken = (
        None,
        0,
        2,
        [0, 1],
        "deep_ep/test/timeout",
        0.8,
        1,
        None,
    )
    w._store = lambda: None  # no store: nobody else reports (rank 1 is "missing")
    t0 = time.monotonic()
    with pytest.raises(DeepEPTimeoutError, match="rank"):
        w.wait(Never(), "a stage")
    assert time.monotonic() - t0 < 0.8 + 0.3


def test_remote_errors_are_deep_ep_errors():
    assert issubclass(RemoteInputError, DeepEPError) and issubclass(deep_ep.PeerFailureError, DeepEPError)
