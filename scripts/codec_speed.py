"""Time of the Triton codecs on one GPU at the normal workload (encode 4096 x 7168 bf16 rows, decode the
8192 rows a rank receives): python scripts/codec_speed.py OUT.json"""

import json
import statistics
import sys

import torch

from deep_ep.compress import make_codec, relative_error


def timed(fn, iters=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1000)
    return statistics.median(ts)


def main():
    T, H = 4096, 7168
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
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
                encode_us=timed(lambda: c.encode(x)),
                decode_us=timed(lambda: c.decode(recv)),
                rel_err_mean=float(err.mean()),
                rel_err_max=float(err.max()),
            )
        )
        print(rows[-1])
    out = dict(
        card=torch.cuda.get_device_name(),
        torch=torch.__version__,
        tokens=T,
        hidden=H,
        decode_rows=2 * T,
        rows=rows,
        command="python scripts/codec_speed.py",
    )
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
