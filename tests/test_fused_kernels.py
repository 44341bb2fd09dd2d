"""The fused path's three kernels (notify, dispatch, combine; deep_ep/kernels/fused.py) with every rank in one
process, under Triton's interpreter (or on one GPU): the ranks' staging buffers are slices of one tensor, and
each kernel runs as two launches per rank (``ROLE`` 1: count, publish, send, raise the flags; ``ROLE`` 2: wait,
plan, receive, reduce), every rank's first half before any rank's second half, as the flag protocol allows.
The same pointer arithmetic, flags, epochs and pinned block as the multi-process run (tests/test_fused.py),
deterministic, and measured by the kernel coverage gate. Oracle: ``deep_ep.reference`` (the torch twin of a
whole dispatch / combine; the host path is tested equal to it by the conformance suite).
"""

from __future__ import annotations

import types

import pytest
import torch

from deep_ep import reference as ref
from deep_ep.agreement import _HEADER, _OP_DISPATCH, make_header
from deep_ep.kernels import protocol as kf
from deep_ep.layout import dispatch_layout_torch
from deep_ep.transport.nvlink.fused import FusedPath, fused_control_bytes
from tests import _interpret
from tests._cases import assert_same, make_case

pytestmark = [
    pytest.mark.kernels,
    pytest.mark.skipif(not (_interpret.enabled() or torch.cuda.is_available()), reason="needs the interpreter or CUDA"),
]

_ALIGN = 256


@pytest.fixture(autouse=True)
def _kernels_on_cpu(monkeypatch):
    monkeypatch.setenv("DEEP_EP_KERNELS_ON_CPU", "1")  # the kernels on CPU tensors (interpreted)


class _Sym:
    def barrier(self):
        pass


class _EmuRank(FusedPath):
    """One rank of the fused path, its staging a slice of a shared tensor (see the module docstring)."""

    def __init__(self, rank, peers, nbytes, device):
        R = len(peers)
        self.rank, self.num_ranks, self.nbytes, self.peers, self.device = rank, R, nbytes, peers, device
        self.settings = types.SimpleNamespace(nvlink_path="fused")
        self.timeout_s = 30.0
        self.sym = _Sym()
        self.waiter = types.SimpleNamespace(seq=0, broken=None)
        self.half_bytes = (nbytes - fused_control_bytes(R)) // 2 // _ALIGN * _ALIGN
        self.halves = [0, self.half_bytes]
        self._fence = False
        self._fused_setup()
        assert self.fused_ready
        self._phases = []


def _ranks(R, nbytes, device):
    mem = torch.zeros((R * nbytes,), dtype=torch.uint8, device=device)
    peers = [mem[p * nbytes : (p + 1) * nbytes] for p in range(R)]
    return [_EmuRank(r, peers, nbytes, device) for r in range(R)]


def _run_phases(ranks):
    """Every rank's ROLE 1 launch, then every rank's ROLE 2 launch, of the launches each recorded."""
    launches = [rk._phases.pop(0) for rk in ranks]
    for role in (1, 2):
        for kernel, split, args, constexprs in launches:
            kernel(split[role - 1], *args, **{**constexprs, "ROLE": role})
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _alloc(device):
    """Outputs poisoned with 7s: every element the kernels promise must be written."""
    return lambda shape, dtype: torch.full(shape, 7, dtype=dtype, device=device)


def _widths(H, elem, K, weights):
    return [H * elem] + ([8 * K] if K else []) + ([4 * K] if weights else [])


def _round(ranks, case, worst, seq, nbias, device, fp8=False, topk=True):
    """One fresh dispatch and one combine of ``case`` through the kernels; every output against the
    reference. ``fp8``: ``x`` travels as an fp8 pair with its scales (no combine); ``topk=False``: only
    ``is_token_in_rank`` (no ids, no weights)."""
    R, E, K = case.num_ranks, case.num_experts, case.topk
    xs = [x.to(device) for x in case.xs]
    idx = [t.to(device) for t in case.topk_idx]
    ws = [w.to(device) for w in case.topk_weights]
    masks = [dispatch_layout_torch(case.topk_idx[r], E, R)[3] for r in range(R)]
    if fp8:
        exp = ref.dispatch(case.fp8, case.topk_idx, E, case.topk_weights, num_worst_tokens=worst)
    elif topk:
        exp = ref.dispatch(case.xs, case.topk_idx, E, case.topk_weights, num_worst_tokens=worst)
    else:
        exp = ref.dispatch(case.xs, None, E, is_token_in_rank=masks, num_worst_tokens=worst)
    H = case.hidden
    if fp8:
        widths = [H, 4 * (H // 128)] + [8 * K, 4 * K]
    else:
        widths = [H * 2] + ([8 * K, 4 * K] if topk else [])
    layouts = []
    for r, rk in enumerate(ranks):
        pe = dispatch_layout_torch(idx[r], E, R)[2] if topk else None
        header = make_header(
            _OP_DISPATCH,
            seq,
            T=xs[r].size(0),
            H=H,
            K=K if topk else -1,
            E=E if topk else -1,
            has_w=int(topk),
            worst=worst,
        )
        fl, _, _ = rk.fused_notify(
            header, masks[r].to(device), idx[r] if topk else None, pe, E if topk else 0, widths, False, False, seq
        )
        layouts.append((fl, rk._slot_of_last))
    _run_phases(ranks)
    plans = []
    for r, rk in enumerate(ranks):
        fl, slot = layouts[r]
        out = rk._out(slot)
        assert int(out[kf.OUT_DONE]) == rk._ticket, f"rank {r}: the notify did not write its block"
        assert int(out[kf.OUT_STATUS]) == 0 and [int(v) for v in out[kf.OUT_VERDICT : kf.OUT_VERDICT + 4]] == [0] * 4
        n = int(out[kf.OUT_NRECV])
        assert n == exp[r].num_recv_tokens, (r, n, exp[r].num_recv_tokens)
        hb = kf.OUT_HEADERS
        heads = out[hb : hb + R * _HEADER].reshape(R, _HEADER)
        assert int(heads[(r + 1) % R][2]) == seq  # every rank's header arrived (its call number)
        assert_same(fl.rpm.cpu(), exp[r].rank_prefix_matrix.to(torch.int32), f"rank {r} rank_prefix_matrix")
        N = worst if worst else n
        plans.append(
            types.SimpleNamespace(
                fused=fl, num_out_rows=N, is_token_in_rank=masks[r].to(device), num_tokens=xs[r].size(0)
            )
        )
    outs = []
    for r, rk in enumerate(ranks):
        if fp8:
            rows = [case.fp8[r][0].to(device), case.fp8[r][1].to(device), idx[r], ws[r]]
        else:
            rows = [xs[r]] + ([idx[r], ws[r]] if topk else [])
        outs.append(rk.fused_dispatch(plans[r], rows, _alloc(device), True, fp8, 4))
    _run_phases(ranks)
    for r in range(R):
        got = [t.cpu() for t in outs[r]]
        n = exp[r].num_recv_tokens
        if fp8:
            assert_same((got[0][:n], got[1][:n]), (exp[r].recv_x[0][:n], exp[r].recv_x[1][:n]), f"rank {r} fp8")
            got = [got[0]] + got[2:]
        else:
            assert_same(got[0][:n], exp[r].recv_x[:n], f"rank {r} recv_x")
        if topk:
            assert_same(got[1][:n], exp[r].recv_topk_idx[:n], f"rank {r} recv_topk_idx")
            assert_same(got[2][:n], exp[r].recv_topk_weights[:n], f"rank {r} recv_topk_weights")
        if worst:
            assert bool((got[0][n:].view(torch.uint8) == 0).all()), r
            if topk:
                assert bool((got[1][n:] == -1).all()) and bool((got[2][n:] == 0).all()), r
    if fp8:
        return
    ys = [outs[r][0] * (r + 2) for r in range(R)]
    rw = [outs[r][2] if topk else None for r in range(R)]
    g = torch.Generator().manual_seed(seq)
    biases = [[torch.randn(xs[s].shape, generator=g).to(xs[s].dtype) for _ in range(nbias)] for s in range(R)]
    combined = []
    for r, rk in enumerate(ranks):
        b = [t.to(device) for t in biases[r]]
        combined.append(rk.fused_combine(plans[r], ys[r], rw[r], b, _alloc(device), 4))
    _run_phases(ranks)
    want = ref.combine(
        [y.cpu() for y in ys], exp, case.tokens, topk_weights=[w.cpu() for w in rw] if topk else None, biases=biases
    )
    for r in range(R):
        assert_same(combined[r][0].cpu(), want[r][0], f"rank {r} combined x")
        if topk:
            assert_same(combined[r][1].cpu(), want[r][1], f"rank {r} combined weights")


CASES = [
    # (R, tokens, hidden, E, K, pattern, worst, nbias)
    (2, [9, 6], 40, 8, 3, "random", 0, 0),
    (3, [7, 0, 11], 24, 12, 2, "random", 0, 1),  # an empty rank
    (2, [10, 5], 17 * 2, 4, 2, "one_expert", 0, 2),  # every token to one expert; odd word width
    (3, [8, 5, 6], 16, 6, 4, "all_neg", 0, 0),  # nothing sent
    (2, [12, 9], 32, 8, 2, "repeat", 40, 0),  # num_worst_tokens padding
    (3, [5, 9, 4], 64, 9, 3, "empty_rank", 0, 0),
]


@pytest.mark.parametrize("worst", [0, 30])
def test_fused_kernels_fp8_rows_and_scales(worst):
    """An fp8 pair: the rows and their scales travel as two regions of the area."""
    device = torch.device("cuda") if torch.cuda.is_available() and not _interpret.enabled() else torch.device("cpu")
    ranks = _ranks(2, 1 << 18, device)
    for rnd in range(2):
        case = make_case(70 + rnd, 2, num_experts=8, hidden=256, topk=2, tokens=[7, 5], fp8=True)
        _round(ranks, case, worst, rnd + 1, 0, device, fp8=True)


def test_fused_kernels_without_topk():
    """Only ``is_token_in_rank``: no ids, no weights, no expert counts."""
    device = torch.device("cuda") if torch.cuda.is_available() and not _interpret.enabled() else torch.device("cpu")
    ranks = _ranks(3, 1 << 18, device)
    for rnd in range(2):
        case = make_case(80 + rnd, 3, num_experts=6, hidden=24, topk=2, tokens=[6, 0, 9])
        _round(ranks, case, 0, rnd + 1, 1, device, topk=False)


@pytest.mark.parametrize("R,tokens,hidden,E,K,pattern,worst,nbias", CASES)
def test_fused_kernels_against_the_reference(R, tokens, hidden, E, K, pattern, worst, nbias):
    """Two rounds (the second on the other data area and metadata parity, with fresh inputs)."""
    device = torch.device("cuda") if torch.cuda.is_available() and not _interpret.enabled() else torch.device("cpu")
    ranks = _ranks(R, 1 << 18, device)
    for rnd in range(2):
        case = make_case(
            100 * R + 10 * rnd + len(pattern), R, num_experts=E, hidden=hidden, topk=K, tokens=tokens, pattern=pattern
        )
        _round(ranks, case, worst, rnd + 1, nbias, device)


def test_fused_notify_verdicts():
    """A rank whose header differs (mismatch), an id outside [-1, E) (bad ids) and more rows than a rank's
    num_worst_tokens (over): each sets its verdict word in every rank's block."""
    device = torch.device("cpu") if _interpret.enabled() else torch.device("cuda")
    R, E, K = 2, 4, 2
    for what in ("mismatch", "bad", "over"):
        ranks = _ranks(R, 1 << 18, device)
        case = make_case(5, R, num_experts=E, hidden=16, topk=K, tokens=[6, 6])
        slots = []
        for r, rk in enumerate(ranks):
            idx = case.topk_idx[r].clone()
            if what == "bad" and r == 1:
                idx[0, 0] = E + 3
            _, _, pe, mask = dispatch_layout_torch(idx, E, R)
            worst = 2 if what == "over" else 0
            header = make_header(_OP_DISPATCH, 1, T=6, H=16 + (r if what == "mismatch" else 0), K=K, E=E, worst=worst)
            rk.fused_notify(header, mask.to(device), idx.to(device), pe.to(device), E, [32, 16], False, False, 1)
            slots.append(rk._slot_of_last)
        _run_phases(ranks)
        word = {"mismatch": 0, "over": 1, "bad": 2}[what]
        for r, rk in enumerate(ranks):
            v = [int(x) for x in rk._out(slots[r])[kf.OUT_VERDICT : kf.OUT_VERDICT + 4]]
            assert v[word] != 0, (what, r, v)
