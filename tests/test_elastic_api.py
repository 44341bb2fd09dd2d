"""ElasticBuffer beyond the data path: bad input on one rank, a V2-style caller, the extras, the small API.

Bad input gets the V1 treatment: the rank with the bad input raises its precise error,
every other rank raises too (naming that rank), nothing hangs, and the buffer keeps working.
"""

from __future__ import annotations

import time
from typing import Optional, Tuple

import pytest
import torch
import torch.distributed as dist

import deep_ep
from deep_ep.errors import (
    BufferDestroyedError,
    DeepEPInputError,
    DeepEPTypeError,
    RankMismatchError,
    RemoteInputError,
)
from tests._cases import device
from tests.test_elastic import SCENARIOS, get_elastic, run_elastic

E, H, K, M = 8, 64, 2, 12


def _inputs(rank: int, T: int = 6, hidden: int = H, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed + rank)
    dev = device()
    x = torch.randn((T, hidden), generator=g).to(torch.bfloat16).to(dev)
    idx = torch.rand((T, E), generator=g).topk(K, dim=1).indices.to(dev)
    w = torch.rand((T, K), generator=g).to(dev)
    return x, idx, w


def _expect(exc_type, fn, *words) -> str:
    try:
        fn()
    except exc_type as e:
        msg = str(e)
        for w in words:
            assert w in msg, f"{w!r} not in error message: {msg}"
        return msg
    except Exception as e:  # pragma: no cover - a wrong type is a failure
        raise AssertionError(f"expected {exc_type.__name__}, got {type(e).__name__}: {e}") from e
    raise AssertionError(f"expected {exc_type.__name__}, nothing raised")


def rank_bad_input_one_rank(rank: int, R: int, backend: str, what: str) -> None:
    """Only rank 1 passes bad input: it raises its precise error naming itself; the others raise
    RemoteInputError naming rank 1; then everything still works."""
    buf = get_elastic(
        backend, num_max_tokens_per_rank=M, **({"ranks_per_node": 1} if backend == "hierarchical" else {})
    )
    x, idx, w = _inputs(rank)
    bad = rank == 1
    args = dict(topk_idx=idx, topk_weights=w, num_experts=E)
    err, words = DeepEPInputError, []
    if what == "too_many_tokens":
        x2, idx2, w2 = _inputs(rank, T=M + 1) if bad else (x, idx, w)
        fn = lambda: buf.dispatch(x2, topk_idx=idx2, topk_weights=w2, num_experts=E)  # noqa: E731
        words = ["num_max_tokens_per_rank"]
    elif what == "expert_id":
        idx2 = torch.full_like(idx, E + 5) if bad else idx
        fn = lambda: buf.dispatch(x, topk_idx=idx2, topk_weights=w, num_experts=E)  # noqa: E731
        words = [f"expert id {E + 5}"]
    elif what == "weights_dtype":
        w2 = w.double() if bad else w
        fn = lambda: buf.dispatch(x, topk_idx=idx, topk_weights=w2, num_experts=E)  # noqa: E731
        err, words = DeepEPTypeError, ["float32"]
    elif what == "x_dtype":
        x2 = x.to(torch.int32) if bad else x
        fn = lambda: buf.dispatch(x2, **args)  # noqa: E731
        err, words = DeepEPTypeError, ["bfloat16"]
    elif what == "cached_rows":
        _, _, _, h, _ = buf.dispatch(x, **args)
        x2 = x[:-1] if bad else x
        fn = lambda: buf.dispatch(x2, handle=h)  # noqa: E731
        words = ["tokens"]
    elif what == "combine_rows":
        recv_x, _, _, h, _ = buf.dispatch(x, **args)
        y = torch.cat([recv_x, recv_x[:1]]) if bad else recv_x
        fn = lambda: buf.combine(y, h)  # noqa: E731
        words = ["combine x must be"]
    elif what == "combine_bias":
        recv_x, _, _, h, _ = buf.dispatch(x, do_expand=True, **args)
        bias = torch.zeros((x.size(0) + (1 if bad else 0), H), dtype=torch.bfloat16, device=x.device)
        fn = lambda: buf.combine(recv_x, h, bias=bias)  # noqa: E731
        words = ["bias"]
    elif what == "combine_handle":
        recv_x, _, _, h, _ = buf.dispatch(x, **args)
        h2 = ("not", "a", "handle") if bad else h
        fn = lambda: buf.combine(recv_x, h2)  # noqa: E731
        err, words = DeepEPTypeError, ["EPHandle"]
    else:  # pragma: no cover
        raise ValueError(what)
    start = time.monotonic()
    if bad:
        _expect(err, fn, "on rank 1", *words)
    else:
        _expect(RemoteInputError, fn, f"on rank {rank}", "rank 1")
    assert time.monotonic() - start < 10, "an error must not wait for a timeout"
    run_elastic(rank, R, backend, 5, SCENARIOS["basic"])


def rank_bad_input_everywhere(rank: int, R: int) -> None:
    """Every rank makes the same mistake: every rank raises the precise error."""
    buf = get_elastic("collective", num_max_tokens_per_rank=M)
    x, idx, w = _inputs(rank)
    _expect(DeepEPInputError, lambda: buf.dispatch(x, topk_idx=idx, num_experts=E, do_zero_padding=True), "do_expand")
    _expect(DeepEPInputError, lambda: buf.dispatch(x, num_experts=E), "topk_idx")
    _expect(DeepEPInputError, lambda: buf.dispatch(x, topk_idx=idx), "num_experts")
    _expect(DeepEPInputError, lambda: buf.dispatch(x, topk_idx=idx, num_experts=E + 1), "multiple")
    _expect(DeepEPInputError, lambda: buf.dispatch(x, topk_idx=idx, num_experts=E, expert_alignment=0), "alignment")
    _expect(
        DeepEPInputError,
        lambda: buf.dispatch(x, topk_idx=idx, num_experts=E, cumulative_local_expert_recv_stats=torch.zeros(3)),
        "cumulative_local_expert_recv_stats",
    )
    _expect(TypeError, lambda: buf.dispatch(x, topk_idx=idx, num_experts=E, previous_event="soon"), "event")
    _, _, _, h, _ = buf.dispatch(x, topk_idx=idx, num_experts=E)
    _expect(DeepEPInputError, lambda: buf.dispatch(x, handle=h, topk_idx=idx), "topk_idx")
    _expect(DeepEPInputError, lambda: buf.dispatch(x, handle=h, do_cpu_sync=True), "do_cpu_sync")
    _expect(DeepEPInputError, lambda: buf.dispatch(x, handle=h, do_expand=True), "do_expand")
    _expect(DeepEPInputError, lambda: buf.dispatch(x, handle=h, expert_alignment=4), "expert_alignment")
    other = get_elastic("collective", num_max_tokens_per_rank=M, deterministic=True)
    _expect(DeepEPInputError, lambda: other.dispatch(x, handle=h), "another ElasticBuffer")
    # No num_max_tokens_per_rank anywhere.
    plain = get_elastic("collective")
    _expect(DeepEPInputError, lambda: plain.dispatch(x, topk_idx=idx, num_experts=E), "num_max_tokens_per_rank")
    run_elastic(rank, R, "collective", 6, SCENARIOS["basic"])


def rank_disagree(rank: int, R: int) -> None:
    """Ranks disagree on the hidden size: every rank raises RankMismatchError naming the odd rank."""
    buf = get_elastic("collective", num_max_tokens_per_rank=M)
    x, idx, w = _inputs(rank, hidden=32 if rank == R - 1 else H)
    _expect(RankMismatchError, lambda: buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E), f"[{R - 1}]")
    run_elastic(rank, R, "collective", 7, SCENARIOS["basic"])


def rank_local_api(rank: int, R: int) -> None:
    """Constructor checks, sizes, domains, events, barrier, destroy."""
    _expect(
        DeepEPInputError, lambda: deep_ep.ElasticBuffer(None, num_max_tokens_per_rank=-1), "num_max_tokens_per_rank"
    )
    _expect(DeepEPInputError, lambda: deep_ep.ElasticBuffer(None, num_cpu_timeout_secs=0), "num_cpu_timeout_secs")
    hint = deep_ep.ElasticBuffer.get_buffer_size_hint(dist.group.WORLD, 128, 7168, num_topk=8)
    assert hint % (2 << 20) == 0 and hint >= 2 * 128 * (7168 * 2) * 2
    assert deep_ep.ElasticBuffer.get_buffer_size_hint(dist.group.WORLD, 128, 7168, 8, True) < hint
    buf = deep_ep.ElasticBuffer(
        dist.group.WORLD, num_max_tokens_per_rank=M, hidden=H, num_topk=K, explicitly_destroy=True, backend="collective"
    )
    assert buf.num_bytes >= deep_ep.ElasticBuffer.get_buffer_size_hint(dist.group.WORLD, M, H, num_topk=K)
    assert (buf.rank_idx, buf.num_ranks) == (rank, R)
    assert buf.get_logical_domain_size() == (1, R) and buf.get_physical_domain_size() == (1, R)
    assert (buf.scaleout_rank_idx, buf.scaleup_rank_idx) == (0, rank)
    n = buf.get_theoretical_num_sms(E, K)
    assert n >= 2 and n % 2 == 0 and buf.get_theoretical_num_qps(n) <= buf.num_allocated_qps
    assert buf.get_comm_stream() is None
    ev = buf.capture()
    ev.current_stream_wait()
    hits = []
    ev.register_hook_after_wait(lambda: hits.append(1))
    with ev(release_handle=True):
        pass
    assert hits == [1]
    buf.barrier()
    buf.barrier(use_comm_stream=False, with_cpu_sync=True)
    x, idx, w = _inputs(rank)
    recv_x, _, _, h, event = buf.dispatch(
        x, topk_idx=idx, topk_weights=w, num_experts=E, async_with_compute_stream=True
    )
    event.current_stream_wait(release_handle=True)
    assert h.token_metadata_at_forward is None and h.channel_linked_list is None and "EPHandle" in repr(h)
    buf.destroy()
    buf.destroy()  # idempotent
    _expect(BufferDestroyedError, lambda: buf.dispatch(x, topk_idx=idx, num_experts=E), "destroyed", f"rank {rank}")
    _expect(BufferDestroyedError, lambda: buf.combine(recv_x, h), "destroyed")
    hb = deep_ep.ElasticBuffer(None, backend="hierarchical", ranks_per_node=1, allow_hybrid_mode=False)
    assert hb.get_logical_domain_size() == (1, R) and hb.get_physical_domain_size() == (R, 1)


def rank_extras(rank: int, R: int) -> None:
    """PP send/recv and all-gather sessions over torch.distributed; Engram names the alternative."""
    buf = get_elastic("collective", num_max_tokens_per_rank=M)
    dev = device()
    _expect(NotImplementedError, lambda: buf.engram_write(torch.zeros((4, 8), device=dev)), "SparseCollective")
    _expect(NotImplementedError, lambda: buf.engram_fetch(torch.zeros((2, 2), dtype=torch.int32)), "one-sided")
    gpu, cpu = deep_ep.ElasticBuffer.get_engram_storage_size_hint(1000, 100, 64)
    assert gpu == 2 << 20 and cpu == 2 << 20
    assert deep_ep.ElasticBuffer.get_pp_buffer_size_hint(3 << 20, 2) == 24 << 20

    # PP: both neighbours are the other rank (2 ranks); two sends in flight before the receive.
    _expect(DeepEPInputError, lambda: buf.pp_send(torch.zeros(4, device=dev), (rank + 1) % R), "pp_set_config")
    buf.pp_set_config(1 << 12, 2)
    peer = (rank + 1) % R
    a = torch.arange(8, dtype=torch.float32, device=dev) + 100 * rank
    b = a * -1
    buf.pp_send(a, peer)
    a.zero_()  # sends copy: the caller may reuse its tensor at once
    buf.pp_send(b, peer)
    got1, got2 = torch.empty(8, device=dev), torch.empty(8, device=dev)
    buf.pp_recv(got1, peer)
    buf.pp_recv(got2, peer)
    want = torch.arange(8, dtype=torch.float32, device=dev) + 100 * peer
    assert torch.equal(got1, want) and torch.equal(got2, -want)
    _expect(DeepEPInputError, lambda: buf.pp_send(torch.zeros(2048, device=dev), peer), "num_max_tensor_bytes")

    # AGRS: in-place tensors, one and several all-gathers per session.
    shapes = [(3, 4), (5,)]
    session = deep_ep.ElasticBuffer.get_agrs_num_max_session_bytes(dist.group.WORLD, shapes, torch.bfloat16)
    assert session == sum(-(-R * n * 2 // 32) * 32 for n in (12, 5))
    buf.agrs_set_config(deep_ep.ElasticBuffer.get_agrs_buffer_size_hint(dist.group.WORLD, session), 4)
    with buf.agrs_new_session():
        t1, t2 = buf.agrs_get_inplace_tensor(shapes, torch.bfloat16)
        t1.fill_(rank + 1)
        t2.fill_(-rank)
        g1, g2, wait = buf.all_gather((t1, t2))
        single = buf.agrs_get_inplace_tensor((2, 2), torch.float32)
        single.fill_(rank * 10)
        g3, wait3 = buf.all_gather(single)
        wait()
        wait3()
    for r in range(R):
        assert bool((g1[r] == r + 1).all()) and bool((g2[r] == -r).all()) and bool((g3[r] == 10 * r).all())
    _expect(DeepEPInputError, lambda: buf.all_gather(single), "session")


# ---------------------------------------------------------------------- a V2-style caller
# Written from DeepEP V2's README (not copied): a process-wide buffer sized by the size hint, the SM count
# from the analytic estimate, dispatch/combine overlapped through events, the expanded layout feeding a
# per-expert "GEMM", cached handles for decoding, and the backward passes as the opposite operations.
_buffer: Optional[deep_ep.ElasticBuffer] = None
_num_sms = 0


def get_v2_buffer(group, num_max_tokens_per_rank: int, hidden: int, num_topk: int, num_experts: int):
    global _buffer, _num_sms
    need = deep_ep.ElasticBuffer.get_buffer_size_hint(group, num_max_tokens_per_rank, hidden, num_topk=num_topk)
    if _buffer is not None and _buffer.group == group and _buffer.num_bytes >= need:
        return _buffer
    _buffer = deep_ep.ElasticBuffer(
        group, num_max_tokens_per_rank=num_max_tokens_per_rank, hidden=hidden, num_topk=num_topk
    )
    _num_sms = _buffer.get_theoretical_num_sms(num_experts, num_topk)
    return _buffer


def moe_layer(x, topk_idx, topk_weights, expert_weights, num_experts: int, num_max_tokens_per_rank: int, align: int):
    """Dispatch (expanded) -> one matmul per local expert over its segment, scaled by the routing weight ->
    combine. ``expert_weights``: float32 ``[L, H, H]`` of this rank's experts."""
    recv_x, recv_topk_idx, recv_weights, handle, event = _buffer.dispatch(
        x,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        num_experts=num_experts,
        num_max_tokens_per_rank=num_max_tokens_per_rank,
        expert_alignment=align,
        num_sms=_num_sms,
        async_with_compute_stream=True,
        do_expand=True,
    )
    event.current_stream_wait()
    assert recv_topk_idx is None
    out = torch.zeros_like(recv_x)
    begin = 0
    for e, end in enumerate(handle.psum_num_recv_tokens_per_expert.tolist()):
        rows = recv_x[begin:end].float() @ expert_weights[e]
        out[begin:end] = (rows * recv_weights[begin:end].unsqueeze(1)).to(out.dtype)
        begin = -(-end // align) * align
    combined, _, event = _buffer.combine(out, handle=handle, num_sms=_num_sms, async_with_compute_stream=True)
    event.current_stream_wait()
    return combined, handle


def decode_step(x, topk_idx, topk_weights, num_experts: int, num_max_tokens_per_rank: int, cached_handle=None):
    """Non-expanded dispatch; with a cached handle the routing is reused (no layout, no host wait)."""
    if cached_handle is not None:
        recv_x, _, _, handle, event = _buffer.dispatch(x, handle=cached_handle, async_with_compute_stream=True)
        event.current_stream_wait()
        return recv_x, cached_handle.topk_idx, handle
    recv_x, recv_topk_idx, _, handle, event = _buffer.dispatch(
        x,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        num_experts=num_experts,
        num_max_tokens_per_rank=num_max_tokens_per_rank,
        num_sms=_num_sms,
        async_with_compute_stream=True,
    )
    event.current_stream_wait()
    return recv_x, recv_topk_idx, handle


def dispatch_backward(grad_recv_x, grad_recv_weights, handle) -> Tuple[torch.Tensor, torch.Tensor]:
    combined, combined_w, event = _buffer.combine(
        grad_recv_x, handle=handle, topk_weights=grad_recv_weights, num_sms=_num_sms, async_with_compute_stream=True
    )
    event.current_stream_wait()
    return combined, combined_w


def combine_backward(grad_combined, handle) -> torch.Tensor:
    grad_x, _, _, _, event = _buffer.dispatch(
        grad_combined, handle=handle, num_sms=_num_sms, async_with_compute_stream=True
    )
    event.current_stream_wait()
    return grad_x


def rank_v2_caller(rank: int, R: int) -> None:
    """The caller above runs unchanged on CPU ranks and computes what one process computes alone."""
    global _buffer
    dev = device()
    num_experts, hidden, topk, T_max, align = 4 * R, 32, 3, 20, 4
    L = num_experts // R
    g = torch.Generator(device="cpu").manual_seed(2024)
    all_w = torch.randn((num_experts, hidden, hidden), generator=g) / hidden**0.5
    tokens = [T_max - 3 * r for r in range(R)]
    xs = [torch.randn((t, hidden), generator=g).to(torch.bfloat16) for t in tokens]
    idxs = [torch.rand((t, num_experts), generator=g).topk(topk, dim=1).indices for t in tokens]
    ws = [torch.rand((t, topk), generator=g) for t in tokens]
    x, idx, w = xs[rank].to(dev), idxs[rank].to(dev), ws[rank].to(dev)

    buf = get_v2_buffer(dist.group.WORLD, T_max, hidden, topk, num_experts)
    assert get_v2_buffer(dist.group.WORLD, T_max, hidden, topk, num_experts) is buf  # reused
    out, handle = moe_layer(x, idx, w, all_w[rank * L : (rank + 1) * L].to(dev), num_experts, T_max, align)
    want = torch.zeros((tokens[rank], hidden), dtype=torch.float32)
    for t in range(tokens[rank]):
        for k in range(topk):
            e = int(idxs[rank][t, k])
            y = (xs[rank][t].float() @ all_w[e]) * ws[rank][t, k]
            want[t] += y.to(torch.bfloat16).float()
    torch.testing.assert_close(out.float().cpu(), want, atol=3e-2, rtol=2e-2)

    # Decoding: fresh, then cached with the same routing (new activations).
    recv_x, recv_idx, h = decode_step(x, idx, w, num_experts, T_max)
    x2 = (x.float() * 2).to(torch.bfloat16)
    recv_x2, cached_idx, h2 = decode_step(x2, None, None, num_experts, T_max, cached_handle=h)
    assert h2 is h and torch.equal(cached_idx, idx)
    torch.testing.assert_close(recv_x2.float(), recv_x.float() * 2, atol=0, rtol=0)

    # Backward: the gradient of dispatch is a combine (weights come back to their slots), of combine a
    # cached dispatch.
    gx, gw = dispatch_backward(torch.ones_like(recv_x), torch.ones((recv_x.size(0), topk), device=dev), h)
    ranks_per_token = torch.zeros((tokens[rank], R), dtype=torch.bool)
    ranks_per_token.scatter_(1, idxs[rank] // L, True)
    assert torch.equal(gx.float().cpu(), ranks_per_token.sum(1, keepdim=True).float().expand(-1, hidden))
    assert torch.equal(gw.cpu(), torch.ones((tokens[rank], topk)))
    assert torch.equal(combine_backward(x, h), recv_x)
    _buffer = None


@pytest.mark.parametrize("backend", ["collective", "hierarchical"])
@pytest.mark.parametrize(
    "what",
    [
        "too_many_tokens",
        "expert_id",
        "weights_dtype",
        "x_dtype",
        "cached_rows",
        "combine_rows",
        "combine_bias",
        "combine_handle",
    ],
)
def test_bad_input_one_rank(rank_pool, backend, what):
    rank_pool(2).run(rank_bad_input_one_rank, backend, what)


def test_bad_input_every_rank(rank_pool):
    rank_pool(2).run(rank_bad_input_everywhere)


def test_ranks_disagree(rank_pool):
    rank_pool(2).run(rank_disagree)


def test_local_api(rank_pool):
    rank_pool(2).run(rank_local_api)


def test_extras(rank_pool):
    rank_pool(2).run(rank_extras)


def test_v2_style_caller(rank_pool):
    rank_pool(2).run(rank_v2_caller)


@pytest.mark.gpu
def test_v2_style_caller_gpu(rank_pool):
    rank_pool(2, backend="nccl").run(rank_v2_caller)


@pytest.mark.gpu
@pytest.mark.parametrize("what", ["too_many_tokens", "expert_id", "combine_rows"])
def test_bad_input_one_rank_gpu(rank_pool, what):
    rank_pool(2, backend="nccl").run(rank_bad_input_one_rank, "collective", what)


# ---------------------------------------------------------------------- the V2 surface and torch defaults
def _signature(fn):
    import inspect

    return [
        (p.name, None if p.default is inspect.Parameter.empty else p.default, p.kind.name == "KEYWORD_ONLY")
        for p in inspect.signature(fn).parameters.values()
        if p.name != "self"
    ]


def test_v2_signatures():
    """Argument names, order and defaults are V2's (deep_ep's additions are keyword-only, at the end)."""
    EB = deep_ep.ElasticBuffer
    assert _signature(EB.__init__) == [
        ("group", None, False),
        ("num_bytes", None, False),
        ("num_cpu_bytes", 0, False),
        ("num_max_tokens_per_rank", 0, False),
        ("hidden", 0, False),
        ("num_topk", 0, False),
        ("use_fp8_dispatch", False, False),
        ("deterministic", False, False),
        ("allow_hybrid_mode", True, False),
        ("allow_multiple_reduction", True, False),
        ("prefer_overlap_with_compute", True, False),
        ("sl_idx", 3, False),
        ("num_allocated_qps", 0, False),
        ("num_cpu_timeout_secs", 300, False),
        ("num_gpu_timeout_secs", 100, False),
        ("explicitly_destroy", False, False),
        ("backend", None, True),
        ("ranks_per_node", None, True),
        ("num_nvl_bytes", 0, True),
    ]
    assert [n for n, _, _ in _signature(EB.dispatch)] == [
        "x",
        "topk_idx",
        "topk_weights",
        "cumulative_local_expert_recv_stats",
        "num_experts",
        "num_max_tokens_per_rank",
        "expert_alignment",
        "num_sms",
        "num_qps",
        "previous_event",
        "previous_event_before_epilogue",
        "async_with_compute_stream",
        "allocate_on_comm_stream",
        "handle",
        "do_handle_copy",
        "do_cpu_sync",
        "do_expand",
        "do_zero_padding",
        "use_tma_aligned_col_major_sf",
    ]
    d = {n: v for n, v, _ in _signature(EB.dispatch)}
    assert (d["num_sms"], d["do_handle_copy"], d["do_cpu_sync"], d["do_expand"], d["expert_alignment"]) == (
        0,
        True,
        None,
        False,
        None,
    )
    assert [n for n, _, _ in _signature(EB.combine)] == [
        "x",
        "handle",
        "topk_weights",
        "bias",
        "num_sms",
        "num_qps",
        "previous_event",
        "previous_event_before_epilogue",
        "async_with_compute_stream",
        "allocate_on_comm_stream",
    ]
    assert [n for n, _, _ in _signature(EB.get_buffer_size_hint)] == [
        "group",
        "num_max_tokens_per_rank",
        "hidden",
        "num_topk",
        "use_fp8_dispatch",
        "allow_hybrid_mode",
        "allow_multiple_reduction",
    ]
    assert [n for n, _, _ in _signature(EB.barrier)] == ["use_comm_stream", "with_cpu_sync", "sequential"]
    for name in (
        "capture",
        "get_comm_stream",
        "get_theoretical_num_sms",
        "get_theoretical_num_qps",
        "get_physical_domain_size",
        "get_logical_domain_size",
        "destroy",
        "engram_write",
        "engram_fetch",
        "pp_set_config",
        "pp_send",
        "pp_recv",
        "create_agrs_session",
        "destroy_agrs_session",
        "agrs_new_session",
        "agrs_set_config",
        "agrs_get_inplace_tensor",
        "all_gather",
        "get_engram_storage_size_hint",
        "get_pp_buffer_size_hint",
        "get_agrs_num_max_session_bytes",
        "get_agrs_buffer_size_hint",
    ):
        assert callable(getattr(EB, name)), name
    assert deep_ep.EPHandle is deep_ep.elastic.EPHandle and "utils" in deep_ep.__all__


def rank_changed_defaults(rank: int, R: int) -> None:
    """A caller that changed torch's default dtype (DeepEP's init_dist sets bfloat16) changes nothing."""
    old = torch.get_default_dtype()
    try:
        for dtype in (torch.bfloat16, torch.float64):
            torch.set_default_dtype(dtype)
            run_elastic(rank, R, "collective", 8, SCENARIOS["no_cpu_sync"])
            run_elastic(rank, R, "collective", 9, SCENARIOS["fp8_colmajor"])
    finally:
        torch.set_default_dtype(old)


def test_changed_torch_defaults(rank_pool):
    rank_pool(2).run(rank_changed_defaults)
