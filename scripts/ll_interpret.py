"""Run the low-latency kernels of deep_ep.kernels.low_latency under Triton's interpreter on the CPU, for R
emulated ranks in one process (their arenas side by side in one tensor, barriers = program order), and
check them against deep_ep.reference. Needs triton importable; run with TRITON_INTERPRET=1:

    TRITON_INTERPRET=1 python scripts/ll_interpret.py [R]

Triton 3.6's interpreter cannot run a loop whose range starts at ``tl.program_id`` (its tensors'
``__index__`` reads a one-element array as a scalar); in triton/runtime/interpreter.py replace
``int(self.handle.data)`` by ``int(self.handle.data.reshape(-1)[0])`` in that ``__index__`` lambda.
The interpreter's fp8 casts differ from the GPU's, so the fp8 rows are compared with the codec kernel
run under the interpreter too (the GPU tests compare against the CPU reference).
"""

import sys

import torch

from deep_ep import reference as ref
from deep_ep.compress import make_codec
from deep_ep.kernels import low_latency as k
from deep_ep.kernels import quant
from deep_ep.transport.nvlink_ll import area_layout
from tests._cases import make_case


class FakeArena:
    def __init__(self, big, rank, R, N):
        self.rank, self.num_ranks, self.nbytes = rank, R, N
        self.u8 = big[rank * N : (rank + 1) * N]
        self.i32, self.bf16 = self.u8.view(torch.int32), self.u8.view(torch.bfloat16)
        self.dbytes = torch.tensor([(p - rank) * N for p in range(R)], dtype=torch.int64)
        self.dwords = self.dbytes // 4


def run(R, use_fp8, ue8m0, seed, pattern="random", tokens=None):
    M, H, E, K = 20, 1536, 4 * R, 3
    tokens = tokens or [M, M - 7, 3, 0][:R]
    case = make_case(seed, R, hidden=H, topk=K, num_experts=E, tokens=tokens, neg_frac=0.2, pattern=pattern)
    lay = area_layout(R, E, M, K, H, use_fp8, ue8m0)
    N = 2 * lay["bytes"]
    big = torch.full((R * N,), 0x55, dtype=torch.uint8)
    arenas = [FakeArena(big, r, R, N) for r in range(R)]
    err = torch.zeros(1, dtype=torch.int32)
    L = lay["L"]
    for r in range(R):
        k.send(case.xs[r].contiguous(), case.topk_idx[r].contiguous(), arenas[r], 0, lay, err, False, ue8m0)
    assert int(err[0]) == 0, err
    codec = make_codec(8, H, use_ue8m0=ue8m0) if use_fp8 else None
    # the codec's own kernel under the interpreter (whose fp8 casts differ from the GPU's): same bytes expected
    sent = [codec.decode_reference(quant.encode(codec, x)).float() if codec else x.float() for x in case.xs]
    exp = ref.low_latency_dispatch(sent, case.topk_idx, M, E)
    states = []
    for r in range(R):
        rows = L * R * M
        if use_fp8:
            vals = torch.zeros((L, R * M, H), dtype=torch.uint8)
            nb = H // 128
            scales = torch.zeros((L, R * M, nb // 4 if ue8m0 else nb), dtype=torch.int32)
            main, tail = vals.view(torch.int32).view(rows, H // 4), scales.view(rows, -1)
        else:
            vals = torch.zeros((L, R * M, H), dtype=torch.bfloat16)
            main, tail = vals.view(torch.int32).view(rows, H // 2), None
        count = torch.zeros(L, dtype=torch.int32)
        src = torch.zeros(rows, dtype=torch.int32)
        inv = torch.full((R * M * K,), -1, dtype=torch.int32)
        k.recv(arenas[r], 0, lay, main, tail, count, src, inv, 5)
        want_rows, want_counts, _ = exp[r]
        assert torch.equal(count, want_counts), (r, count, want_counts)
        if use_fp8:
            sc = scales.view(torch.uint8).to(torch.int32) << 23 if ue8m0 else scales
            sc = sc.view(torch.float32).view(L, R * M, -1)
            got = vals.view(torch.float8_e4m3fn).float() * sc.repeat_interleave(128, dim=-1)
        else:
            got = vals.float()
        for l in range(L):
            n = int(want_counts[l])
            assert torch.equal(got[l, :n], want_rows[l, :n]), (r, l)
        states.append((count, src, inv))
    ys = [(e[0] * torch.arange(1, L + 1).view(L, 1, 1)).to(torch.bfloat16) for e in exp]
    want = ref.low_latency_combine(ys, exp, case.topk_idx, case.topk_weights)
    mags = ref.low_latency_combine([y.abs() for y in ys], exp, case.topk_idx, [w.abs() for w in case.topk_weights])
    for r in range(R):  # (program order stands for the barriers)
        k.put_weights(case.topk_weights[r].float().contiguous(), arenas[r], N // 2, lay)
    for r in range(R):
        k.combine_send(ys[r].contiguous(), states[r][2], arenas[r], N // 2, lay, 4)
    for r in range(R):
        out = torch.empty((tokens[r], H), dtype=torch.bfloat16)
        if tokens[r]:
            k.combine_reduce(arenas[r], N // 2, lay, case.topk_idx[r].contiguous(), out)
        # each rank's partial sum is rounded to bf16 once: unit 2**-8 of at most sum |w| |y|
        lim = 2e-2 + 1e-2 * want[r].float().abs() + 2.0**-8 * mags[r].float()
        assert not ((out.float() - want[r].float()).abs() > lim).any(), (r, float((out.float() - want[r]).abs().max()))
    print("ok", R, use_fp8, ue8m0, seed, pattern)


if __name__ == "__main__":
    R = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    run(R, False, False, 1)
    run(R, True, False, 2)
    run(R, True, True, 3)
    run(R, True, False, 4, pattern="one_expert")
    run(R, False, False, 5, tokens=[0] * R)
    # invalid ids: skipped and flagged (bit 1: repeated in a token, bit 2: out of range)
    lay = area_layout(1, 4, 4, 3, 128, False, False)
    N = 2 * lay["bytes"]
    a = FakeArena(torch.zeros(N, dtype=torch.uint8), 0, 1, N)
    for idx, bit in (([[1, 1, 2]], 1), ([[0, 4, -1]], 2), ([[0, -2, 3]], 2)):
        err = torch.zeros(1, dtype=torch.int32)
        k.send(torch.ones((1, 128), dtype=torch.bfloat16), torch.tensor(idx), a, 0, lay, err, False, False)
        assert int(err[0]) == bit, (idx, err)
        cnt = a.i32[:4].tolist()
        assert cnt == [int(e in idx[0]) for e in range(4)], (idx, cnt)
    print("ok invalid ids flagged")
