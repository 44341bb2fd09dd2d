"""Tile sizes of the Triton codecs on one GPU (normal workload: encode 4096 x 7168 bf16 rows, decode
8192 rows): python scripts/codec_tune.py. Prints us per variant (median of 30 CUDA-event timings)."""

import os

import torch
import triton
from codec_speed import timed  # scripts/ is on the path when run as a script

from deep_ep.compress import make_codec
from deep_ep.kernels import quant as q


def main():
    T, H = 4096, 7168
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    levels = () if os.environ.get("AUTO_ONLY") else ((8, 128), (4, 32))
    for level, _block in levels:
        c = make_codec(level, H)
        nb, W, V = c.blocks, c.row_bytes, c.scale_bytes
        ref = c.encode(x)
        recv = torch.cat([ref, ref])
        out = torch.empty_like(ref)
        dec = torch.empty((2 * T, H), dtype=torch.bfloat16, device="cuda")
        for bb in (4, 8, 16, 32, 64, 128, 256):
            if bb > triton.next_power_of_2(nb):
                continue
            for nw in (2, 4, 8):
                if level == 8:
                    enc = lambda: q._enc8[(T, triton.cdiv(nb, bb))](
                        x, x, out, H, nb, W, V, BB=bb, ROUND=False, UE8M0=False, GATHER=False, num_warps=nw
                    )
                    de = lambda: q._dec8[(2 * T, triton.cdiv(nb, bb))](
                        recv, dec, H, nb, W, V, BB=bb, UE8M0=False, num_warps=nw
                    )
                else:
                    enc = lambda: q._enc4[(T, triton.cdiv(nb, bb))](
                        x, x, out, H, nb, W, V, BB=bb, GATHER=False, num_warps=nw
                    )
                    de = lambda: q._dec4[(2 * T, triton.cdiv(nb, bb))](recv, dec, H, nb, W, V, BB=bb, num_warps=nw)
                te = timed(enc)
                same = torch.equal(out, ref)
                td = timed(de)
                print(
                    f"level {level} BB {bb:4d} warps {nw}: encode {te:7.1f} us ({'ok' if same else 'DIFF'}) "
                    f"decode {td:7.1f} us",
                    flush=True,
                )
    c = make_codec("auto", H, ratio=float(os.environ.get("RATIO", "0.3")))
    nb, W = c.blocks, c.row_bytes
    ref = c.encode(x)
    out = torch.empty_like(ref)
    recv = torch.cat([ref, ref])
    dec = torch.empty((2 * T, H), dtype=torch.bfloat16, device="cuda")
    for nw in (2, 4, 8, 16):
        te = timed(lambda: q._enc_auto[(T,)](x, x, out, H, nb, W, c.upgrades, NBP=256, GATHER=False, num_warps=nw))
        td = timed(lambda: q._dec_auto[(2 * T,)](recv, dec, H, nb, W, NBP=256, num_warps=nw))
        print(
            f"auto warps {nw}: encode {te:7.1f} us ({'ok' if torch.equal(out, ref) else 'DIFF'}) decode {td:7.1f} us",
            flush=True,
        )
    print("bytes: encode reads", T * H * 2 / 1e6, "MB; decode writes", 2 * T * H * 2 / 1e6, "MB")


if __name__ == "__main__":
    main()
