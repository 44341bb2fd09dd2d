"""Bad input and faults: clear errors on every rank, never a hang, never a silent wrong answer."""

from __future__ import annotations

import datetime
import time

import pytest
import torch
import torch.distributed as dist

import deep_ep
from deep_ep import reference as ref
from deep_ep.errors import (
    BufferDestroyedError,
    DeepEPInputError,
    DeepEPTimeoutError,
    DeepEPTypeError,
    RankMismatchError,
    RemoteInputError,
)
from tests._cases import assert_same, device, get_buffer, make_case
from tests.test_conformance import run_scenario


def _layout(buf, idx, E):
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    return dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx)


def _expect(exc_type, fn, *words):
    try:
        fn()
    except exc_type as e:
        msg = str(e)
        for w in words:
            assert w in msg, f"{w!r} not in error message: {msg}"
        return msg
    except Exception as e:  # pragma: no cover - wrong type is a failure
        raise AssertionError(f"expected {exc_type.__name__}, got {type(e).__name__}: {e}") from e
    raise AssertionError(f"expected {exc_type.__name__}, nothing raised")


def rank_local_errors(rank, R):
    """Errors raised before any communication (get_dispatch_layout, constructor, class methods)."""
    dev = device()
    buf = get_buffer()
    E = 8
    _expect(
        DeepEPTypeError, lambda: buf.get_dispatch_layout(torch.zeros((4, 2), dtype=torch.int32, device=dev), E), "int64"
    )
    _expect(
        DeepEPInputError, lambda: buf.get_dispatch_layout(torch.zeros((4,), dtype=torch.int64, device=dev), E), "2-D"
    )
    if dev.type == "cpu":  # on CUDA the value check is an asynchronous device assert
        _expect(
            DeepEPInputError,
            lambda: buf.get_dispatch_layout(torch.full((4, 2), E, dtype=torch.int64), E),
            f"expert id {E}",
        )
        _expect(
            DeepEPInputError,
            lambda: buf.get_dispatch_layout(torch.full((4, 2), -2, dtype=torch.int64), E),
            "expert id -2",
        )
    _expect(
        DeepEPInputError,
        lambda: buf.get_dispatch_layout(torch.zeros((4, 2), dtype=torch.int64, device=dev), 7),
        "not divisible",
    )
    _expect(DeepEPInputError, lambda: deep_ep.Buffer.set_num_sms(3), "even")
    _expect(DeepEPInputError, lambda: deep_ep.Buffer(dist.group.WORLD, compression_level=5), "compression_level")
    _expect(
        DeepEPInputError,
        lambda: deep_ep.Buffer(dist.group.WORLD, backend="hierarchical", ranks_per_node=5),
        "must divide",
    )
    _expect(ValueError, lambda: deep_ep.Buffer(dist.group.WORLD, backend="bogus"), "unknown backend")
    _expect(
        DeepEPInputError,
        lambda: buf.dispatch(torch.zeros((2, 8), dtype=torch.bfloat16, device=dev), expert_alignment=0),
        "expert_alignment",
    )
    _expect(
        DeepEPInputError,
        lambda: buf.dispatch(
            torch.zeros((2, 8), dtype=torch.bfloat16, device=dev), async_finish=False, allocate_on_comm_stream=True
        ),
        "allocate_on_comm_stream",
    )


def rank_bad_input_everywhere(rank, R, what):
    """Every rank passes the same kind of bad input: every rank raises the precise error."""
    dev = device()
    buf = get_buffer()
    E, T, H = 8, 6, 64
    idx = torch.randint(0, E, (T, 2), device=dev)
    x = torch.randn((T, H), device=dev).to(torch.bfloat16)
    lay = _layout(buf, idx, E)
    if what == "dtype":
        _expect(DeepEPTypeError, lambda: buf.dispatch(x.to(torch.int32), **lay), "bfloat16")
    elif what == "rank3":
        _expect(DeepEPInputError, lambda: buf.dispatch(x.view(T, 8, 8), **lay), "2-D")
    elif what == "fp8_hidden":
        v = torch.zeros((T, 100), dtype=torch.float8_e4m3fn, device=dev)
        _expect(DeepEPInputError, lambda: buf.dispatch((v, torch.ones((T, 1), device=dev)), **lay), "128")
    elif what == "fp8_no_scales":
        _expect(
            DeepEPTypeError,
            lambda: buf.dispatch(torch.zeros((T, 128), dtype=torch.float8_e4m3fn, device=dev), **lay),
            "scales",
        )
    elif what == "weights_shape":
        _expect(
            DeepEPInputError,
            lambda: buf.dispatch(x, topk_weights=torch.ones((T, 3), device=dev), **lay),
            "topk_weights",
            "[6, 2]",
        )
    elif what == "weights_dtype":
        _expect(
            DeepEPTypeError,
            lambda: buf.dispatch(x, topk_weights=torch.ones((T, 2), dtype=torch.float64, device=dev), **lay),
            "float32",
        )
    elif what == "rows":
        _expect(DeepEPInputError, lambda: buf.dispatch(x[: T - 1], **lay), "5 tokens", "6 rows")
    elif what == "no_layout":
        _expect(DeepEPInputError, lambda: buf.dispatch(x), "topk_idx")
    elif what == "no_expert_counts":
        lay2 = dict(lay)
        lay2.pop("num_tokens_per_expert")
        _expect(DeepEPInputError, lambda: buf.dispatch(x, **lay2), "num_tokens_per_expert")
    # The Buffer keeps working after a rejected call.
    run_scenario(rank, R, "collective", 5, {})


def rank_bad_input_one_rank(rank, R, what, backend="collective"):
    """Only rank 1 passes bad input: it raises its precise error, the others a RemoteInputError (no hang)."""
    dev = device()
    buf = get_buffer(backend)
    E, T, H = 8, 6, 64
    idx = torch.randint(0, E, (T, 2), device=dev)
    x = torch.randn((T, H), device=dev).to(torch.bfloat16)
    lay = _layout(buf, idx, E)
    w = torch.rand((T, 2), device=dev)
    bad = rank == 1
    start = time.monotonic()
    if what == "expert_id":
        if bad:
            lay["topk_idx"] = torch.full((T, 2), E + 3, dtype=torch.int64, device=dev)
        fn = lambda: buf.dispatch(x, topk_weights=w, **lay)  # noqa: E731
        msg_bad = f"expert id {E + 3}"
    elif what == "weights_shape":
        fn = lambda: buf.dispatch(x, topk_weights=w[:, :1] if bad else w, **lay)  # noqa: E731
        msg_bad = "topk_weights"
    elif what == "combine_shape":
        recv_x, _, _, _, handle, _ = buf.dispatch(x, **lay)
        y = recv_x[:, : H // 2] if bad else recv_x
        y = torch.cat([y, y[:1]]) if bad else y
        fn = lambda: buf.combine(y, handle)  # noqa: E731
        msg_bad = "combine x must be"
    else:  # pragma: no cover
        raise ValueError(what)
    if bad:
        _expect(DeepEPInputError, fn, msg_bad)
    else:
        _expect(RemoteInputError, fn, "rank 1")
    assert time.monotonic() - start < 10
    run_scenario(rank, R, backend, 6, {})


def rank_disagree(rank, R, what, backend="collective"):
    """Ranks disagree on a shape: every rank raises RankMismatchError naming the odd rank."""
    dev = device()
    buf = get_buffer(backend)
    E, T, H, K = 8, 6, 64, 2
    if what == "num_experts" and rank == R - 1:
        E = 16
    if what == "hidden" and rank == R - 1:
        H = 32
    if what == "topk" and rank == R - 1:
        K = 3
    idx = torch.randint(0, E, (T, K), device=dev)
    x = torch.randn((T, H), device=dev).to(torch.bfloat16)
    if what == "dtype" and rank == R - 1:
        x = x.float()
    lay = _layout(buf, idx, E)
    msg = _expect(RankMismatchError, lambda: buf.dispatch(x, **lay), f"[{R - 1}]")
    assert {"num_experts": "num_experts", "hidden": "hidden", "topk": "num_topk", "dtype": "dtype"}[what] in msg
    run_scenario(rank, R, backend, 7, {})


def rank_worst_too_small(rank, R, backend="collective"):
    dev = device()
    buf = get_buffer(backend)
    E, T = 8, 6
    idx = torch.arange(E, device=dev).repeat(T, 1)[:, :4]  # every token to rank 0 (and 1 if R == 2)
    x = torch.randn((T, 16), device=dev).to(torch.bfloat16)
    lay = _layout(buf, idx, E)
    _expect(
        DeepEPInputError,
        lambda: buf.dispatch(x, num_worst_tokens=2 if rank == 0 else 100, **lay),
        "rank 0 receives",
        "num_worst_tokens is 2",
    )


def rank_noncontiguous(rank, R):
    """Non-contiguous x and topk_idx are copied, with correct results."""
    dev = device()
    buf = get_buffer()
    case = make_case(31, R, hidden=64)
    E = case.num_experts
    exp = ref.dispatch(case.xs, case.topk_idx, E, case.topk_weights)
    wide = torch.zeros((case.tokens[rank], 128), dtype=torch.bfloat16, device=dev)
    wide[:, ::2] = case.xs[rank].to(dev)
    x = wide[:, ::2]
    assert not x.is_contiguous()
    idx_wide = torch.zeros((case.tokens[rank], 6), dtype=torch.int64, device=dev)
    idx_wide[:, ::2] = case.topk_idx[rank].to(dev)
    idx = idx_wide[:, ::2]
    lay = _layout(buf, idx, E)
    recv_x, recv_idx, recv_w, _, _, _ = buf.dispatch(x, topk_weights=case.topk_weights[rank].to(dev), **lay)
    assert_same(recv_x, exp[rank].recv_x, "recv_x")
    assert_same(recv_idx, exp[rank].recv_topk_idx, "recv_topk_idx")


def rank_handle_errors(rank, R):
    dev = device()
    buf = get_buffer()
    other = get_buffer(timeout_s=50.0)
    E, T = 8, 5
    idx = torch.randint(0, E, (T, 2), device=dev)
    x = torch.randn((T, 32), device=dev).to(torch.bfloat16)
    lay = _layout(buf, idx, E)
    _, _, _, _, handle, _ = buf.dispatch(x, **lay)
    _expect(DeepEPInputError, lambda: buf.dispatch(x, handle=handle, topk_idx=idx), "cached dispatch")
    _expect(DeepEPInputError, lambda: other.dispatch(x, handle=handle), "another Buffer")
    _expect(DeepEPTypeError, lambda: buf.combine(x, ("not", "a", "handle")), "handle")
    _expect(DeepEPInputError, lambda: buf.dispatch(x[:3], handle=handle), "tokens")


def rank_timeout(rank, R):
    """A rank that does not arrive: the others raise within timeout_s naming it; the Buffer is then unusable."""
    sub = dist.new_group(list(range(R)), backend="gloo", timeout=datetime.timedelta(seconds=20))
    buf = deep_ep.Buffer(sub, timeout_s=1.0)
    E, T = 4 * R, 4
    idx = torch.randint(0, E, (T, 2))
    x = torch.randn((T, 16)).to(torch.bfloat16)
    lay = _layout(buf, idx, E)
    late = R - 1
    if rank == late:
        time.sleep(3.5)
    start = time.monotonic()
    try:
        buf.dispatch(x, **lay)
    except DeepEPTimeoutError as e:
        waited = time.monotonic() - start
        msg = str(e)
    else:
        raise AssertionError("expected DeepEPTimeoutError")
    if rank != late:
        assert f"rank(s) {late}" in msg and "did not arrive" in msg, msg
        assert waited < 1.0 + 2.5, waited
    else:
        assert "gave up" in msg, msg
    _expect(BufferDestroyedError, lambda: buf.dispatch(x, **lay), "unusable")
    return msg


def rank_default_dtype_device(rank, R):
    """Works when the caller changed torch's global defaults."""
    old_dtype = torch.get_default_dtype()
    dev = device()
    try:
        torch.set_default_dtype(torch.bfloat16)
        if dev.type == "cuda":
            torch.set_default_device(dev)
        run_scenario(rank, R, "collective", 11, dict(weights=True, nbias=2))
        run_scenario(rank, R, "collective", 12, dict(worst=True))
    finally:
        torch.set_default_dtype(old_dtype)
        if dev.type == "cuda":
            torch.set_default_device(None)


def test_local_errors(rank_pool):
    rank_pool(2).run(rank_local_errors)


@pytest.mark.parametrize(
    "what",
    [
        "dtype",
        "rank3",
        "fp8_hidden",
        "fp8_no_scales",
        "weights_shape",
        "weights_dtype",
        "rows",
        "no_layout",
        "no_expert_counts",
    ],
)
def test_bad_input_everywhere(rank_pool, what):
    rank_pool(2).run(rank_bad_input_everywhere, what)


@pytest.mark.parametrize("what", ["expert_id", "weights_shape", "combine_shape"])
def test_bad_input_on_one_rank(rank_pool, what):
    rank_pool(2).run(rank_bad_input_one_rank, what, timeout=60)


@pytest.mark.parametrize("what", ["num_experts", "hidden", "topk", "dtype"])
def test_ranks_disagree(rank_pool, what):
    rank_pool(2).run(rank_disagree, what)


def test_ranks_disagree_4(rank_pool):
    rank_pool(4).run(rank_disagree, "hidden")


def test_worst_too_small(rank_pool):
    rank_pool(2).run(rank_worst_too_small)


def test_noncontiguous(rank_pool):
    rank_pool(2).run(rank_noncontiguous)


def test_handle_errors(rank_pool):
    rank_pool(2).run(rank_handle_errors)


def test_rank_that_stops_participating(rank_pool):
    msgs = rank_pool(2).run(rank_timeout, timeout=60)
    assert "did not arrive" in msgs[0]


def test_default_dtype_device(rank_pool):
    rank_pool(2).run(rank_default_dtype_device)


@pytest.mark.gpu
@pytest.mark.parametrize("what", ["expert_id", "weights_shape"])
def test_bad_input_on_one_rank_gpu(rank_pool, what):
    rank_pool(2, backend="nccl").run(rank_bad_input_one_rank, what, timeout=60)


@pytest.mark.gpu
@pytest.mark.parametrize("what", ["num_experts", "hidden"])
def test_ranks_disagree_gpu(rank_pool, what):
    rank_pool(2, backend="nccl").run(rank_disagree, what)


@pytest.mark.gpu
def test_default_dtype_device_gpu(rank_pool):
    rank_pool(2, backend="nccl").run(rank_default_dtype_device)


@pytest.mark.gpu
def test_local_errors_gpu(rank_pool):
    rank_pool(2, backend="nccl").run(rank_local_errors)


def rank_nvlink_needs_cuda(rank, R):
    with pytest.raises(deep_ep.DeepEPError, match="NCCL group on CUDA"):
        deep_ep.Buffer(dist.group.WORLD, backend="nvlink")


def test_nvlink_needs_cuda(rank_pool):
    rank_pool(2).run(rank_nvlink_needs_cuda)


def rank_bad_argument_one_rank(rank, R):
    """A bad scalar argument on one rank only: it raises, the others get RemoteInputError (no hang, no desync)."""
    dev = device()
    buf = get_buffer()
    idx = torch.randint(0, 8, (6, 2), device=dev)
    x = torch.randn((6, 32), device=dev).to(torch.bfloat16)
    lay = _layout(buf, idx, 8)
    if rank == 1:
        _expect(DeepEPInputError, lambda: buf.dispatch(x, expert_alignment=0, **lay), "expert_alignment")
    else:
        _expect(RemoteInputError, lambda: buf.dispatch(x, **lay), "rank 1")
    run_scenario(rank, R, "collective", 8, {})


def test_bad_argument_on_one_rank(rank_pool):
    rank_pool(2).run(rank_bad_argument_one_rank, timeout=60)
