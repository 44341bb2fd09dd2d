"""``codec-speed``: encode / decode time of the Triton codecs on one GPU at the normal workload.

Encodes ``--tokens`` x ``--hidden`` bf16 rows (4096 x 7168: what a rank sends) and decodes twice as many
(what it receives from 2 ranks), median of ``--iters`` CUDA-event timings per level (8, 4, ``'auto'`` at
ratio 0.3), with each codec's relative L2 error. Wrote ``benchmarks/results/2026-12-01-nvidia-h200-codec-speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from deep_ep.bench.timing import CudaTimer, median


def main(argv, prog: str = "deep-ep tools codec-speed") -> int:
    """Run the tool.

    Args:
        argv: its arguments (``--help`` lists them).
        prog: its name in usage lines.

    Returns:
        The exit status.
    """
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].split(": ", 1)[-1])
    p.add_argument("--tokens", type=int, default=4096, help="rows encoded (default 4096)")
    p.add_argument("--hidden", type=int, default=7168, help="values per row (default 7168)")
    p.add_argument("--iters", type=int, default=50, help="timed runs, median reported (default 50)")
    p.add_argument("--json", metavar="FILE", help="write the rows here")
    a = p.parse_args(argv)
    from deep_ep.compress import make_codec, relative_error

    T, H = a.tokens, a.hidden
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    timer = CudaTimer(x.device, flush_bytes=0)
    rows = []
    for level, ratio in ((8, None), (4, None), ("auto", 0.3)):
        c = make_codec(level, H, ratio=ratio)
        packed = c.encode(x)
        recv = torch.cat([packed, packed])
        err = relative_error(x.float(), c.decode(packed, torch.float32))
        rows.append(
            dict(
                level=level,
                row_bytes=c.row_bytes,
                ratio_of_bf16=c.row_bytes / (2 * H),
                encode_us=median(timer(lambda c=c: c.encode(x), a.iters, 5)),
                decode_us=median(timer(lambda c=c, recv=recv: c.decode(recv), a.iters, 5)),
                rel_err_mean=float(err.mean()),
                rel_err_max=float(err.max()),
            )
        )
        print(rows[-1], flush=True)
    if a.json:
        out = dict(
            card=torch.cuda.get_device_name(),
            torch=torch.__version__,
            tokens=T,
            hidden=H,
            decode_rows=2 * T,
            rows=rows,
            command=f"{prog} " + " ".join(argv),
        )
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {a.json}")
    return 0
