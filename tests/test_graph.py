"""CUDA-graph capture and replay of the nvlink transport's cached dispatch and combine (GPU only)."""

from __future__ import annotations

import pytest
import torch

from tests._cases import assert_same, device, get_buffer, make_case


def _capture(step):
    """``(graph, its outputs)`` of ``step`` (warmed up twice on a side stream first)."""
    from deep_ep.bench.timing import capture

    return capture(step)


def rank_graph_replay(rank, R, seed, worst_extra):
    """Capture cached dispatch + combine of a num_worst_tokens handle once, replay on fresh data."""
    import deep_ep
    from deep_ep import reference as ref

    dev = device()
    buf = get_buffer("nvlink")
    case = make_case(seed, R, hidden=256, topk=4, num_experts=16, tokens=[96, 64, 80, 40][:R])
    E = case.num_experts
    worst = sum(case.tokens) + worst_extra
    idx = case.topk_idx[rank].to(dev)
    w = case.topk_weights[rank].to(dev)
    x_static = case.xs[rank].to(dev).clone()
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    out = buf.dispatch(
        x_static,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=idx,
        topk_weights=w,
        num_worst_tokens=worst,
    )
    handle = out[4]
    exp = ref.dispatch(case.xs, case.topk_idx, E, case.topk_weights, num_worst_tokens=worst)
    n_recv = exp[rank].num_recv_tokens
    assert handle.num_recv_tokens == -1, "a num_worst_tokens handle does not know its count on the host"
    assert_same(out[0][:n_recv], exp[rank].recv_x[:n_recv], "eager recv_x")

    def step():
        rx = buf.dispatch(x_static, handle=handle)[0]
        y = rx * (rank + 2)
        return rx, buf.combine(y, handle)[0]

    g, (rx_static, comb_static) = _capture(step)
    for trial in range(3):
        fresh = make_case(seed + 100 + trial, R, hidden=256, topk=4, num_experts=16, tokens=case.tokens)
        xs_new = [torch.randn_like(t.float()).to(t.dtype) for t in fresh.xs]  # new data, same routing
        x_static.copy_(xs_new[rank].to(dev))
        rx_static.fill_(7)  # poison the outputs
        comb_static.fill_(7)
        g.replay()
        torch.cuda.synchronize()
        e = ref.dispatch(xs_new, case.topk_idx, E, case.topk_weights, num_worst_tokens=worst)
        assert_same(rx_static[:n_recv], e[rank].recv_x[:n_recv], f"replayed recv_x, trial {trial}")
        assert bool((rx_static[n_recv:] == 0).all()), "padding rows are zero"
        ys = [t.recv_x * (r + 2) for r, t in enumerate(e)]
        want = ref.combine(ys, e, case.tokens)
        assert_same(comb_static, want[rank][0], f"replayed combine, trial {trial}")
    # Eager calls still work after replays (the host-side phase state is consistent).
    again = buf.dispatch(x_static, handle=handle)[0]
    assert_same(again[:n_recv], e[rank].recv_x[:n_recv], "eager dispatch after replays")
    del deep_ep


@pytest.mark.gpu
@pytest.mark.parametrize("seed,worst_extra", [(1, 0), (2, 37)])
def test_graph_capture_replay_nvlink(rank_pool, seed, worst_extra):
    rank_pool(2, backend="nccl").run(rank_graph_replay, seed, worst_extra)


def rank_fresh_graph(rank, R, seed):
    """Capture a *fresh* num_worst_tokens dispatch (layout, routing and all) + combine; replay with new
    routing and new data every time (the plan is built on the device, nothing waits for the host)."""
    import deep_ep
    from deep_ep import reference as ref

    dev = device()
    buf = get_buffer("nvlink")
    tokens = [96, 64, 80, 40][:R]
    case = make_case(seed, R, hidden=200, topk=4, num_experts=16, tokens=tokens)
    E, worst = case.num_experts, sum(tokens)
    x_s = case.xs[rank].to(dev).clone()
    idx_s = case.topk_idx[rank].to(dev).clone()
    w_s = case.topk_weights[rank].to(dev).clone()

    def step():
        _, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx_s, E)
        rx, ridx, rw, counts, h, _ = buf.dispatch(
            x_s,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=idx_s,
            topk_weights=w_s,
            num_worst_tokens=worst,
        )
        assert counts == [] and h.num_recv_tokens == -1
        y = rx * (rank + 2)
        comb, comb_w, _ = buf.combine(y, h, topk_weights=rw)
        return rx, ridx, rw, comb, comb_w

    g, outs = _capture(step)
    for trial in range(3):
        fresh = make_case(seed + 50 + trial, R, hidden=200, topk=4, num_experts=16, tokens=tokens)
        x_s.copy_(fresh.xs[rank].to(dev))
        idx_s.copy_(fresh.topk_idx[rank].to(dev))
        w_s.copy_(fresh.topk_weights[rank].to(dev))
        for o in outs:
            o.fill_(7)
        g.replay()
        torch.cuda.synchronize()
        e = ref.dispatch(fresh.xs, fresh.topk_idx, E, fresh.topk_weights, num_worst_tokens=worst)
        n = e[rank].num_recv_tokens
        assert_same(outs[0][:n], e[rank].recv_x[:n], f"replayed recv_x, trial {trial}")
        assert bool((outs[0][n:] == 0).all()), "padding rows are zero"
        assert_same(outs[1], e[rank].recv_topk_idx, f"replayed recv_topk_idx, trial {trial}")
        assert_same(outs[2], e[rank].recv_topk_weights, f"replayed recv_topk_weights, trial {trial}")
        ys = [t.recv_x * (r + 2) for r, t in enumerate(e)]
        want = ref.combine(ys, e, tokens, topk_weights=[t.recv_topk_weights for t in e])
        assert_same(outs[3], want[rank][0], f"replayed combine, trial {trial}")
        assert_same(outs[4], want[rank][1], f"replayed combined weights, trial {trial}")
    del deep_ep


@pytest.mark.gpu
@pytest.mark.parametrize("seed", [3, 4])
def test_graph_capture_fresh_dispatch_nvlink(rank_pool, seed):
    rank_pool(2, backend="nccl").run(rank_fresh_graph, seed)


def rank_deferred_check(rank, R, kind):
    """What a num_worst_tokens dispatch cannot raise at once (nothing waits for the host) the next call on the
    Buffer raises, on every rank: ``'overflow'``, a rank receives more rows than num_worst_tokens;
    ``'bad_ids'``, an expert id outside [-1, E) on one rank (the entry is dropped: received as -1)."""
    import deep_ep

    dev = device()
    buf = get_buffer("nvlink")
    case = make_case(5, R, hidden=64, topk=2, num_experts=8, tokens=[40, 30][:R])
    idx = case.topk_idx[rank].to(dev)
    sent = idx.clone()
    if kind == "bad_ids" and rank == R - 1:
        sent[0, 0] = case.num_experts + 3  # one bad entry on the last rank only
    _, _, per_expert, in_rank, _ = buf.get_dispatch_layout(sent, case.num_experts)
    worst = 3 if kind == "overflow" else sum(case.tokens)
    out = buf.dispatch(
        case.xs[rank].to(dev),
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=sent,
        topk_weights=torch.ones(sent.shape, dtype=torch.float32, device=dev),
        num_worst_tokens=worst,
    )
    torch.cuda.synchronize()
    assert out[0].shape[0] == worst
    L = case.num_experts // R
    assert bool(((out[1] >= -1) & (out[1] < L)).all()), "received ids are local ids or -1"
    match = "more tokens than its num_worst_tokens" if kind == "overflow" else "outside \\[-1, num_experts\\)"
    with pytest.raises(deep_ep.DeepEPInputError, match=match):
        buf.get_dispatch_layout(idx, case.num_experts)
    buf.get_dispatch_layout(idx, case.num_experts)  # reported once; the Buffer still works


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["overflow", "bad_ids"])
def test_num_worst_tokens_deferred_error_at_next_call(rank_pool, kind):
    rank_pool(2, backend="nccl").run(rank_deferred_check, kind)


@pytest.mark.gpu(1)
def test_graph_capture_fresh_dispatch_one_gpu(rank_pool):
    rank_pool(1, backend="nccl").run(rank_fresh_graph, 8)
