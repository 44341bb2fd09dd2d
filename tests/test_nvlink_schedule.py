"""The nvlink transport's data path on the CPU: its schedule (windows, rounds, halves, offsets) checked
against the oracle, with plain tensors standing in for the symmetric staging buffers and a thread
barrier for the device barrier. The GPU run of the same transport is in test_conformance.py."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from deep_ep import layout
from deep_ep import reference as ref
from deep_ep.transport.base import Plan
from deep_ep.transport.nvlink.schedule import _windows
from deep_ep.transport.nvlink.transport import _META_SLOT, NVLinkTransport
from tests._cases import assert_same, make_case


def _slow_reader(barrier):
    """Rank 0 leaves every barrier late, so its reads overlap the others' next writes if a phase lacked
    the protection it needs (the race shows as wrong rows instead of depending on luck)."""

    def wait():
        barrier.wait()
        time.sleep(0.004)

    return wait


def _fake_transports(R: int, data_bytes: int, chunks: int = 1):
    """R transports sharing CPU staging tensors; ``_barrier`` is a thread barrier with a timeout."""
    meta = 2 * R * _META_SLOT * 8
    nbytes = meta + data_bytes
    staging = [torch.full((nbytes,), 0xAB, dtype=torch.uint8) for _ in range(R)]
    barrier = threading.Barrier(R, timeout=30)
    ts = []
    for r in range(R):
        t = NVLinkTransport.__new__(NVLinkTransport)
        t.rank, t.num_ranks, t.device, t.options, t.num_sms = r, R, torch.device("cpu"), {}, 20
        t.meta_bytes, t.nbytes = meta, nbytes
        t._use_staging(staging)
        t.side, t.chunks, t.min_chunk_bytes = None, chunks, 0  # operations in order, chunks of any size
        t.pull_sm = chunks % 2 == 1  # both ways of reading the peers
        t.peer_streams = []
        t._barrier = _slow_reader(barrier) if r == 0 else barrier.wait
        ts.append(t)
    return ts


def _plan(rank: int, masks):
    R = len(masks)
    C = torch.stack([m.sum(dim=0, dtype=torch.int64) for m in masks])  # C[s][d]
    n = int(C[:, rank].sum())
    return Plan(
        rank=rank,
        num_ranks=R,
        num_tokens=masks[rank].size(0),
        is_token_in_rank=masks[rank],
        rank_prefix_matrix=layout.rank_prefix_matrix(C),
        send_counts=C[rank].tolist(),
        recv_counts=C[:, rank].tolist(),
        num_recv_tokens=n,
        num_out_rows=n,
        counts=C,
    )


def _run_threads(fn, R):
    results, errors = [None] * R, []

    def body(r):
        try:
            results[r] = fn(r)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(R)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    if errors:
        raise errors[0]
    return results


def test_windows_offsets_and_rounds():
    C = [[5, 3, 0], [2, 0, 4], [1, 1, 1]]
    off, rounds = _windows(C, 3, cap=3)
    assert off == [[0, 0, 3], [0, 2, 2], [0, 1, 2]]
    assert rounds == 1 + (3 - 1) // 3 + 1  # longest non-self sequence: rank 1 (2 + 4 = 6 rows)
    assert _windows([[4, 0], [0, 7]], 2, cap=2) == ([[0, 0], [0, 0]], 0)


def _data_bytes(mode, case, masks):
    """Staging data bytes that make the call use halves in one round, the whole area, or rounds."""
    _R, K, H = case.num_ranks, case.topk, case.hidden
    per_row = 4 * H + 8 * K + 4 * K  # fp32 x, int64 ids, fp32 weights
    longest = max(int(m.sum()) - int(m[:, r].sum()) for r, m in enumerate(masks))
    need = 3 * 256 + longest * per_row  # one round of the longest sequence, aligned regions
    rounds = 2 * (3 * 256 + 2 * per_row) + 512  # two rows a half, about five in the whole area
    assert longest > 6, "the case must be long enough to need rounds"
    # "mixed": dispatch rows (with ids) need the whole area, combine rows (without) fit a half.
    need_c = 2 * 256 + longest * (4 * H + 4 * K)
    mixed = 2 * (need_c + (need - need_c) // 2) + 256
    return {"half": 2 * need + 4096, "full": need + need // 2, "rounds": rounds, "mixed": mixed}[mode]


@pytest.mark.parametrize(
    "R,mode,seed,chunks",
    [
        (2, "half", 1, 1),
        (3, "half", 2, 3),
        (4, "rounds", 3, 2),
        (2, "rounds", 4, 1),
        (3, "full", 5, 2),
        (2, "full", 6, 1),
        (2, "mixed", 7, 4),
        (3, "mixed", 8, 1),
        (4, "half", 9, 5),
        (2, "half", 10, 40),
    ],
)
def test_nvlink_schedule_matches_oracle(R, mode, seed, chunks):
    """Dispatch then combine twice on one set of buffers (halves alternate), whole area or rounds when small."""
    case = make_case(
        seed,
        R,
        hidden=48 + seed,
        topk=3,
        num_experts=4 * R,
        dtype=torch.float32,
        tokens=[17, 0, 23, 9][:R] if R > 2 else [19, 14],
    )
    E = case.num_experts
    masks = [ref.expert_rank_mask(t, E, R) for t in case.topk_idx]
    plans = [_plan(r, masks) for r in range(R)]
    ts = _fake_transports(R, _data_bytes(mode, case, masks), chunks)
    exp = ref.dispatch(case.xs, case.topk_idx, E, case.topk_weights)
    alloc = lambda shape, dtype: torch.empty(shape, dtype=dtype)  # noqa: E731
    bias = [[torch.randn(case.tokens[r], case.hidden) for r in range(R)] for _ in range(2)]

    def rank_ops(r):
        """Two rounds of: dispatch (x, ids, weights), dispatch of x alone, combine; all in one thread so
        that a fast rank runs ahead into the next operation while a slow one still reads."""
        t, out = ts[r], []
        for rep in range(2):
            recv = t.dispatch(plans[r], [case.xs[r], case.topk_idx[r], case.topk_weights[r]], alloc)
            again = t.dispatch(plans[r], [case.xs[r] * (3 + rep)], alloc)
            got = t.combine(plans[r], recv[0] * (r + 2), recv[2], [bias[rep][r]], alloc)
            out.append((recv, again, got))
        return out

    results = _run_threads(rank_ops, R)
    for rep in range(2):
        for r in range(R):
            recv, again, _ = results[r][rep]
            assert_same(recv[0], exp[r].recv_x, f"recv_x rank {r} rep {rep}")
            got_idx, got_w = layout.localize_topk(recv[1], recv[2], r, E // R)
            assert_same(got_idx, exp[r].recv_topk_idx, f"recv_topk_idx rank {r}")
            assert_same(got_w, exp[r].recv_topk_weights, f"recv_topk_weights rank {r}")
            assert_same(again[0], exp[r].recv_x * (3 + rep), f"recv_x (x only) rank {r} rep {rep}")
        ys = [results[r][rep][0][0] * (r + 2) for r in range(R)]
        ws = [results[r][rep][0][2] for r in range(R)]
        want = ref.combine(ys, exp, case.tokens, topk_weights=ws, biases=[[b] for b in bias[rep]])
        for r in range(R):
            got = results[r][rep][2]
            assert_same(got[0], want[r][0], f"combined x rank {r} rep {rep}")
            assert_same(got[1], want[r][1], f"combined weights rank {r} rep {rep}")
    scheds = {k: v for k, v in plans[0].cache.items() if isinstance(k, tuple) and k[0].startswith("nvlink")}
    assert len(scheds) == 3
    for (kind, widths), sc in scheds.items():
        big = kind == "nvlink_dispatch" and len(widths) == 3
        assert sc["full"] == (mode == "full" or (mode == "mixed" and big)), (kind, widths)
        assert (len(sc["steps"]) > 1) == (mode == "rounds")
        if mode != "rounds":
            n_chunks = len(sc["steps"][0][0] if kind == "nvlink_combine" else sc["steps"][0])
            assert n_chunks == chunks
    # Combine reduces tokens below ready[c] after chunk c: each must have all its rows by then.
    from deep_ep.transport.nvlink.schedule import _split

    for r in range(R):
        sc = plans[r].cache[next(k for k in plans[r].cache if isinstance(k, tuple) and k[0] == "nvlink_combine")]
        C = plans[r].counts.tolist()
        slots = layout.token_slots(masks[r])
        for c, t_ready in enumerate(sc["ready"]):
            for j in range(R):
                if j != r and t_ready:
                    s_j = slots[:t_ready, j]
                    assert int(s_j.max()) < _split(C[r][j], len(sc["ready"]))[c + 1], (r, c, j)


def test_nvlink_schedule_too_small_names_size():
    ts = _fake_transports(2, 600)
    with pytest.raises(Exception, match="num_nvl_bytes >="):
        ts[0]._layout((4096,))


@pytest.mark.parametrize("R,seed,extra", [(2, 11, 0), (3, 12, 5), (4, 13, 2), (3, 15, 0)])
def test_nvlink_device_path_matches_oracle(R, seed, extra):
    """The num_worst_tokens path (layout on the device, torch twins of its kernels): counts published
    through the metadata areas, rows pushed into their slots, padding zero, combine back; twice."""
    case = make_case(
        seed,
        R,
        hidden=40 + seed,
        topk=3,
        num_experts=4 * R,
        dtype=torch.float32,
        tokens=[17, 0, 23, 9][:R] if R > 2 else [19, 14],
    )
    E, K, H = case.num_experts, case.topk, case.hidden
    masks = [ref.expert_rank_mask(t, E, R) for t in case.topk_idx]
    worst = sum(case.tokens) + extra
    per_row = 4 * H + 8 * K + 4 * K
    area = 3 * 256 + per_row * (max(worst, R * max(case.tokens)) + 1)
    ts = _fake_transports(R, area + 1024)  # the path uses the whole data area
    for t in ts:
        t._device_setup()
    exp = ref.dispatch(case.xs, case.topk_idx, E, case.topk_weights, num_worst_tokens=worst)
    alloc = lambda shape, dtype: torch.empty(shape, dtype=dtype)  # noqa: E731
    bias = [torch.randn(case.tokens[r], H) for r in range(R)]

    def rank_ops(r):
        t, out = ts[r], []
        for rep in range(2):
            counts = t.publish_meta(masks[r].sum(dim=0, dtype=torch.int64))[:, :R].clone()
            plan = Plan(
                rank=r,
                num_ranks=R,
                num_tokens=case.tokens[r],
                is_token_in_rank=masks[r],
                rank_prefix_matrix=torch.cumsum(counts, 0).to(torch.int32),
                send_counts=None,
                recv_counts=None,
                num_recv_tokens=-1,
                num_out_rows=worst,
                counts=None,
            )
            plan.device = layout.device_layout(masks[r], counts, r)
            recv = t.dispatch(plan, [case.xs[r], case.topk_idx[r], case.topk_weights[r]], alloc)
            again = t.dispatch(plan, [case.xs[r] * (3 + rep)], alloc)
            got = t.combine(plan, recv[0] * (r + 2), recv[2], [bias[r]], alloc)
            host = t.dispatch(_plan(r, masks), [case.xs[r] * 5], alloc)  # the host path in between
            out.append((recv, again, got, plan, host))
        return out

    results = _run_threads(rank_ops, R)
    for rep in range(2):
        for r in range(R):
            recv, again, _, plan, host = results[r][rep]
            assert_same(host[0], exp[r].recv_x[: exp[r].num_recv_tokens] * 5, f"host-path dispatch rank {r}")
            n = exp[r].num_recv_tokens
            assert int(plan.device.recv[0]) == n
            assert_same(plan.rank_prefix_matrix, exp[r].rank_prefix_matrix.to(torch.int32), "rank_prefix_matrix")
            assert recv[0].shape[0] == worst
            assert_same(recv[0][:n], exp[r].recv_x[:n], f"recv_x rank {r} rep {rep}")
            assert bool((recv[0][n:] == 0).all()) and bool((recv[1][n:] == 0).all()), "padding rows are zero"
            got_idx, got_w = layout.localize_topk(recv[1][:n], recv[2][:n], r, E // R)
            assert_same(got_idx, exp[r].recv_topk_idx[:n], f"recv_topk_idx rank {r}")
            assert_same(got_w, exp[r].recv_topk_weights[:n], f"recv_topk_weights rank {r}")
            assert_same(again[0][:n], exp[r].recv_x[:n] * (3 + rep), f"recv_x (x only) rank {r} rep {rep}")
        ys = [results[r][rep][0][0] * (r + 2) for r in range(R)]
        ws = [results[r][rep][0][2] for r in range(R)]
        want = ref.combine(ys, exp, case.tokens, topk_weights=ws, biases=[[b] for b in bias])
        for r in range(R):
            got = results[r][rep][2]
            assert_same(got[0], want[r][0], f"combined x rank {r} rep {rep}")
            assert_same(got[1], want[r][1], f"combined weights rank {r} rep {rep}")


def test_nvlink_device_path_too_small_names_size():
    ts = _fake_transports(2, 4096)
    ts[0]._device_setup()
    with pytest.raises(Exception, match="num_nvl_bytes >="):
        ts[0]._device_fits(1000, (64,), "a dispatch")


@pytest.mark.parametrize(
    "R,mode,seed,chunks,max_runs",
    [
        (2, "half", 11, 2, 64),
        (3, "half", 12, 1, 64),
        (4, "full", 13, 3, 64),
        (2, "full", 14, 2, 64),
        (3, "half", 15, 2, 0),
        (2, "rounds", 16, 2, 64),
    ],
)
def test_nvlink_push_dispatch_matches_oracle(R, mode, seed, chunks, max_runs, monkeypatch):
    """The push dispatch (copies of token runs into the receivers' staging, chunked copy-out) against the
    oracle, twice in a row with a combine between (halves alternate); with few runs allowed, or rows that
    do not fit one area, it falls back to the pull and still matches."""
    import deep_ep.transport.nvlink.schedule as ns

    monkeypatch.setattr(ns, "MAX_PUSH_RUNS", max_runs)
    case = make_case(
        seed,
        R,
        hidden=40 + seed,
        topk=3,
        num_experts=4 * R,
        dtype=torch.float32,
        tokens=[17, 0, 23, 9][:R] if R > 2 else [19, 14],
    )
    E = case.num_experts
    masks = [ref.expert_rank_mask(t, E, R) for t in case.topk_idx]
    plans = [_plan(r, masks) for r in range(R)]
    ts = _fake_transports(R, _data_bytes(mode, case, masks), 1)
    oks, slots, gate = [], [None] * R, threading.Barrier(R, timeout=30)

    def gather(r):
        def all_gather_ints(v, stage):
            slots[r] = v.reshape(-1).to(torch.int64).clone()
            gate.wait()
            got = torch.stack(list(slots))
            gate.wait()
            return got

        return all_gather_ints

    for r, t in enumerate(ts):
        t.push, t.push_chunks, t.pull_sm = True, chunks, False
        t.all_gather_ints = gather(r)
    exp = ref.dispatch(case.xs, case.topk_idx, E, case.topk_weights)
    alloc = lambda shape, dtype: torch.empty(shape, dtype=dtype)  # noqa: E731

    def rank_ops(r):
        t, out = ts[r], []
        for rep in range(2):
            recv = t.dispatch(plans[r], [case.xs[r], case.topk_idx[r], case.topk_weights[r]], alloc)
            again = t.dispatch(plans[r], [case.xs[r] * (3 + rep)], alloc)
            t.combine(plans[r], recv[0], recv[2], [], alloc)
            out.append((recv, again))
        return out

    results = _run_threads(rank_ops, R)
    for rep in range(2):
        for r in range(R):
            recv, again = results[r][rep]
            assert_same(recv[0], exp[r].recv_x, f"recv_x rank {r} rep {rep}")
            got_idx, got_w = layout.localize_topk(recv[1], recv[2], r, E // R)
            assert_same(got_idx, exp[r].recv_topk_idx, f"recv_topk_idx rank {r}")
            assert_same(again[0], exp[r].recv_x * (3 + rep), f"recv_x (x only) rank {r} rep {rep}")
    for r in range(R):
        pushed = [v for k, v in plans[r].cache.items() if isinstance(k, tuple) and k[0] == "nvlink_push"]
        oks.append(all(v is not None for v in pushed) and bool(pushed))
        if oks[-1]:
            assert all(len(v["chunks"]) == chunks for v in pushed)
    assert all(oks) == (max_runs > 0 and mode != "rounds"), oks


@pytest.mark.parametrize(
    "R,mode,seed,chunks,level",
    [(2, "half", 21, 1, 8), (3, "half", 22, 3, 4), (2, "rounds", 23, 1, "auto"), (4, "full", 24, 2, 8)],
)
def test_nvlink_compressed_dispatch_matches_oracle(R, mode, seed, chunks, level):
    """The transport's fused compression (encode while packing, decode after each pull; own rows round-
    tripped) against the oracle dispatch of the round-tripped rows, in halves, rounds, the whole area and
    chunks."""
    from deep_ep.compress import make_codec

    H = 256
    case = make_case(
        seed,
        R,
        hidden=H,
        topk=3,
        num_experts=4 * R,
        dtype=torch.bfloat16,
        tokens=[17, 0, 23, 9][:R] if R > 2 else [19, 14],
    )
    E = case.num_experts
    codec = make_codec(level, H)
    masks = [ref.expert_rank_mask(t, E, R) for t in case.topk_idx]
    plans = [_plan(r, masks) for r in range(R)]
    nbytes = _data_bytes(mode, case, masks)
    ts = _fake_transports(R, nbytes, chunks)
    sent = [codec.roundtrip(x) for x in case.xs]
    exp = ref.dispatch(sent, case.topk_idx, E, case.topk_weights)
    alloc = lambda shape, dtype: torch.empty(shape, dtype=dtype)  # noqa: E731

    def rank_ops(r):
        return [ts[r].dispatch(plans[r], [case.xs[r], case.topk_idx[r]], alloc, codec=codec) for _ in range(2)]

    results = _run_threads(rank_ops, R)
    for r in range(R):
        for rep, recv in enumerate(results[r]):
            assert recv[0].dtype == torch.bfloat16 and recv[0].shape == exp[r].recv_x.shape
            assert_same(recv[0], exp[r].recv_x, f"recv_x rank {r} rep {rep}")
            got_idx, _ = layout.localize_topk(recv[1], None, r, E // R)
            assert_same(got_idx, exp[r].recv_topk_idx, f"recv_topk_idx rank {r}")
