"""The nvlink transport's data path on the CPU: its schedule (windows, rounds, halves, offsets) checked
against the oracle, with plain tensors standing in for the symmetric staging buffers and a thread
barrier for the device barrier. The GPU run of the same transport is in test_conformance.py."""
from __future__ import annotations

import threading

import pytest
import torch

from deep_ep import layout
from deep_ep import reference as ref
from deep_ep.transport.base import Plan
from deep_ep.transport.nvlink import _META_SLOT, NVLinkTransport, _windows
from tests._cases import assert_same, make_case


def _fake_transports(R: int, data_bytes: int):
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
        t._barrier = barrier.wait
        ts.append(t)
    return ts


def _plan(rank: int, masks):
    R = len(masks)
    C = torch.stack([m.sum(dim=0, dtype=torch.int64) for m in masks])   # C[s][d]
    n = int(C[:, rank].sum())
    return Plan(rank=rank, num_ranks=R, num_tokens=masks[rank].size(0), is_token_in_rank=masks[rank],
                rank_prefix_matrix=layout.rank_prefix_matrix(C), send_counts=C[rank].tolist(),
                recv_counts=C[:, rank].tolist(), num_recv_tokens=n, num_out_rows=n, counts=C)


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
    assert rounds == 1 + (3 - 1) // 3 + 1       # longest non-self sequence: rank 1 (2 + 4 = 6 rows)
    assert _windows([[4, 0], [0, 7]], 2, cap=2) == ([[0, 0], [0, 0]], 0)


@pytest.mark.parametrize("R,data_bytes,seed", [(2, 1 << 20, 1), (3, 1 << 20, 2), (4, 3000, 3), (2, 2600, 4),
                                               (3, 5000, 5)])
def test_nvlink_schedule_matches_oracle(R, data_bytes, seed):
    """Dispatch then combine twice on one set of buffers (halves alternate), in rounds when small."""
    case = make_case(seed, R, hidden=48 + seed, topk=3, num_experts=4 * R, dtype=torch.float32,
                     tokens=[17, 0, 23, 9][:R] if R > 2 else None)
    E = case.num_experts
    masks = [ref.expert_rank_mask(t, E, R) for t in case.topk_idx]
    plans = [_plan(r, masks) for r in range(R)]
    ts = _fake_transports(R, data_bytes)
    exp = ref.dispatch(case.xs, case.topk_idx, E, case.topk_weights)
    alloc = lambda shape, dtype: torch.empty(shape, dtype=dtype)  # noqa: E731
    for rep in range(2):
        recv = _run_threads(lambda r: ts[r].dispatch(plans[r], [case.xs[r], case.topk_idx[r], case.topk_weights[r]],
                                                     alloc), R)
        for r in range(R):
            assert_same(recv[r][0], exp[r].recv_x, f"recv_x rank {r} rep {rep}")
            got_idx, got_w = layout.localize_topk(recv[r][1], recv[r][2], r, E // R)
            assert_same(got_idx, exp[r].recv_topk_idx, f"recv_topk_idx rank {r}")
            assert_same(got_w, exp[r].recv_topk_weights, f"recv_topk_weights rank {r}")
        ys = [recv[r][0] * (r + 2) for r in range(R)]
        ws = [recv[r][2] for r in range(R)]
        bias = [torch.randn(case.tokens[r], case.hidden) for r in range(R)]
        got = _run_threads(lambda r: ts[r].combine(plans[r], ys[r], ws[r], [bias[r]], alloc), R)
        want = ref.combine(ys, exp, case.tokens, topk_weights=ws, biases=[[b] for b in bias])
        for r in range(R):
            assert_same(got[r][0], want[r][0], f"combined x rank {r} rep {rep}")
            assert_same(got[r][1], want[r][1], f"combined weights rank {r} rep {rep}")
    assert ts[0].phase > 0


def test_nvlink_schedule_too_small_names_size():
    ts = _fake_transports(2, 600)
    with pytest.raises(Exception, match="num_nvl_bytes >="):
        ts[0]._layout((4096,))
