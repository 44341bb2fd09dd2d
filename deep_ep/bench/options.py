"""Options of ``deep-ep bench``: the argument parser and the resolved :class:`BenchConfig`.

Defaults follow docs/bench.md on GPU (the ``normal`` workload: 4096 tokens per rank,
hidden 7168, top-8 of 256 experts, bf16 and fp8 dispatch) and shrink on CPU so
that two gloo ranks finish in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional

import torch

#: The docs/bench.md ``sweep`` workload: tokens per rank.
SWEEP_TOKENS = (128, 512, 1024, 2048, 4096, 8192)
#: Workload defaults per device kind.
GPU_DEFAULTS = dict(tokens=4096, hidden=7168, topk=8, experts=256, iters=30, warmup=5)
CPU_DEFAULTS = dict(tokens=256, hidden=1024, topk=4, experts=32, iters=10, warmup=2)
#: Wire formats of dispatched activations this benchmark knows.
WIRES = ("bf16", "fp8")
#: Modes: docs/bench.md's normal workload (and its token sweep) and the low-latency workload.
MODES = ("normal", "low-latency")
#: low-latency tokens per rank: default and ``--sweep``
LL_TOKENS = dict(cuda=128, cpu=32)
LL_SWEEP = (1, 8, 32, 128, 256, 512)
SKEWS = ("uniform", "zipf1.0", "zipf1.2")


class BenchOptionError(ValueError):
    """An option of ``deep-ep bench`` is invalid; the message says which and why."""


@dataclasses.dataclass
class BenchConfig:
    """A fully resolved benchmark run (picklable: it is sent to every spawned rank)."""

    device: str  # 'cuda' or 'cpu'
    world_size: int
    tokens: tuple  # tokens per rank, one case each
    hidden: int
    topk: int
    experts: int
    wires: tuple  # subset of WIRES
    backends: Optional[tuple]  # None: every known backend the machine supports
    num_sms: Optional[int]
    iters: int
    warmup: int
    routing: str = "uniform"  # one of SKEWS
    workload: str = "normal"  # 'normal' or 'sweep' (docs/bench.md names)
    baselines: bool = True
    flush_bytes: int = 256 << 20  # L2 flush scratch on GPU
    seed: int = 0
    timeout_s: float = 300.0
    progress: bool = True
    compression: tuple = ()  # levels timed as compressed dispatch of bf16 rows: 8, 4, 'auto'
    compression_ratio: float = 0.3  # the 'auto' byte target
    experts_given: bool = False  # --experts given (low-latency otherwise takes docs/bench.md's 256 / 288)
    num_sms_sweep: tuple = ()  # --num-sms with several values: num_sms of each run (num_sms: the first)
    notes: tuple = ()  # what the run should tell its user about the options (printed before it starts)

    @property
    def dist_backend(self) -> str:
        """The torch.distributed backend the ranks use."""
        return "nccl" if self.device == "cuda" else "gloo"

    @property
    def raw_name(self) -> str:
        """Name of the one-all_to_all baseline: ``nccl-raw`` or ``gloo-raw``."""
        return f"{self.dist_backend}-raw"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``deep-ep bench`` options (shared by the CLI and ``benchmarks/bench_normal.py``).

    Args:
        p: the parser.
    """
    g = p.add_argument_group("workload (defaults: docs/bench.md 'normal' on GPU, a small one on CPU)")
    g.add_argument(
        "--mode",
        default="normal",
        choices=MODES,
        help="docs/bench.md workload: normal (default) or low-latency (128 tokens, fp8 dispatch, bf16 combine; "
        "--sweep: 1..512 tokens)",
    )
    g.add_argument("--tokens", type=int, help="tokens per rank (GPU 4096, CPU 256)")
    g.add_argument("--hidden", type=int, help="hidden size (GPU 7168, CPU 1024)")
    g.add_argument("--topk", type=int, help="experts per token (GPU 8, CPU 4)")
    g.add_argument("--experts", type=int, help="global experts (GPU 256, CPU 32)")
    g.add_argument(
        "--skew", default="uniform", choices=SKEWS, help="routing: top-k of uniform random scores, or Zipf over experts"
    )
    g.add_argument(
        "--sweep",
        action="store_true",
        help=f"docs/bench.md token sweep {','.join(map(str, SWEEP_TOKENS))} (bf16 unless --dtype)",
    )
    g.add_argument("--dtype", choices=("bf16", "fp8", "both"), help="dispatch wire format (GPU: both, CPU: bf16)")
    g.add_argument(
        "--compression",
        default="",
        help="also time the cached dispatch of the bf16 rows compressed by deep_ep at these levels "
        "(comma list of 8, 4, auto; wires c8 / int4 / auto, with the codec's error in the row)",
    )
    g.add_argument("--compression-ratio", type=float, default=0.3, help="byte target of 'auto' (default 0.3)")
    g.add_argument("--seed", type=int, default=0, help="routing/data seed (rank r uses seed+r)")
    g = p.add_argument_group("ranks and backends")
    g.add_argument("--world-size", type=int, help="ranks to spawn (GPU: all local GPUs, CPU: 2)")
    g.add_argument("--device", choices=("cuda", "cpu"), help="force CPU/gloo or CUDA/NCCL ranks")
    g.add_argument(
        "--backend",
        action="append",
        help="deep_ep backend(s) to time, repeatable or comma list (default: all known; "
        "those that cannot run are listed as skipped)",
    )
    g.add_argument("--no-baselines", action="store_true", help="skip the raw and peer-copy baselines")
    g.add_argument(
        "--num-sms",
        help="Buffer.set_num_sms(N) before creating buffers; a comma list (e.g. 16,24,32) "
        "sweeps it in one run (one row set per value, the baselines once)",
    )
    g = p.add_argument_group("timing and output")
    g.add_argument("--iters", type=int, help="timed runs per case, median reported (GPU 30, CPU 10)")
    g.add_argument("--warmup", type=int, help="untimed runs per case first (GPU 5, CPU 2)")
    g.add_argument("--timeout", type=float, default=300.0, help="seconds any collective may wait before the run fails")
    g.add_argument(
        "--json",
        metavar="FILE",
        help="write the docs/bench.md result file; a directory gets <date>-<card>-<workload>.json",
    )
    g.add_argument(
        "--png",
        metavar="FILE",
        help="also draw GB/s against tokens per rank (one line per backend, op, wire and SM count; needs matplotlib)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


#: bench wire name of each compression level
COMPRESSED_WIRES = {8: "c8", 4: "int4", "auto": "auto"}


def _compression(text: str) -> tuple:
    levels = []
    for item in (text or "").split(","):
        item = item.strip().lower()
        if not item:
            continue
        level = "auto" if item == "auto" else int(item) if item.isdigit() else item
        if level not in COMPRESSED_WIRES:
            raise BenchOptionError(f"--compression takes 8, 4 and auto, got {item!r}")
        levels.append(level)
    return tuple(levels)


def _split(values) -> list:
    """Flatten repeated, comma-separated option values."""
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Resolve parsed options against this machine.

    Args:
        args: the parsed options (:func:`add_arguments`).

    Returns:
        The :class:`BenchConfig` (``notes``: what the run should tell its user first).

    Raises:
        BenchOptionError: an option is invalid, or every backend asked for by name cannot run here.
    """
    if args.mode not in MODES:
        raise BenchOptionError(f"--mode {args.mode!r} is not one of {', '.join(MODES)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchOptionError("--device cuda but CUDA is not available")
    d = GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    world = args.world_size if args.world_size is not None else (gpus if device == "cuda" else 2)
    if world < 1:
        raise BenchOptionError(f"--world-size must be >= 1, got {world}")
    if device == "cuda" and world > gpus:
        raise BenchOptionError(f"--world-size {world} but only {gpus} GPUs are visible")

    low_latency = args.mode == "low-latency"
    if low_latency:
        tokens = LL_SWEEP if args.sweep else (args.tokens if args.tokens is not None else LL_TOKENS[device],)
    else:
        tokens = SWEEP_TOKENS if args.sweep else (args.tokens if args.tokens is not None else d["tokens"],)
    hidden = args.hidden if args.hidden is not None else d["hidden"]
    topk = args.topk if args.topk is not None else d["topk"]
    experts = args.experts if args.experts is not None else d["experts"]
    if args.dtype:
        wires = WIRES if args.dtype == "both" else (args.dtype,)
    else:
        wires = ("bf16",) if (device == "cpu" or args.sweep) else WIRES
    iters = args.iters if args.iters is not None else d["iters"]
    warmup = args.warmup if args.warmup is not None else d["warmup"]

    if min(tokens) < 1 or hidden < 1 or topk < 1 or experts < 1 or iters < 1 or warmup < 0:
        raise BenchOptionError("--tokens, --hidden, --topk, --experts, --iters must be >= 1 and --warmup >= 0")
    if experts % world:
        raise BenchOptionError(f"--experts {experts} is not a multiple of --world-size {world}")
    if topk > experts:
        raise BenchOptionError(f"--topk {topk} > --experts {experts}")
    if "fp8" in wires and hidden % 128:
        raise BenchOptionError(f"fp8 needs --hidden a multiple of 128, got {hidden}")
    sms: tuple = ()
    if args.num_sms is not None:
        try:
            sms = tuple(int(v) for v in _split([str(args.num_sms)]))
        except ValueError:
            raise BenchOptionError(
                f"--num-sms takes even ints >= 2 (a comma list sweeps), got {args.num_sms!r}"
            ) from None
        if not sms or any(v < 2 or v % 2 for v in sms):
            raise BenchOptionError(f"--num-sms must be even and >= 2, got {args.num_sms}")
        if low_latency and len(set(sms)) > 1:
            raise BenchOptionError(
                "--num-sms takes one value with --mode low-latency (its kernels size their "
                "grids from the GPU, not from the SM count)"
            )
    notes = []
    if sms and device == "cpu":
        notes.append(
            "--num-sms has no effect on CPU ranks (it bounds the SMs of the GPU kernels); "
            + ("the rows of each value are timed anyway" if len(set(sms)) > 1 else "timing as without it")
        )
    backends = tuple(dict.fromkeys(_split(args.backend))) if args.backend else None
    if backends:
        from deep_ep.transport import BACKENDS

        unknown = [b for b in backends if b != "auto" and b not in BACKENDS]
        if unknown:
            raise BenchOptionError(f"unknown --backend {', '.join(unknown)}; deep_ep knows auto, {', '.join(BACKENDS)}")
    if low_latency and args.tokens is None and not args.sweep and device == "cpu":
        notes.append(
            f"{tokens[0]} tokens per rank on CPU (docs/bench.md's low-latency workload has {LL_TOKENS['cuda']}, on GPU; "
            "fewer on CPU ranks so that the run takes seconds; --tokens sets it)"
        )
    return BenchConfig(
        device=device,
        world_size=world,
        tokens=tuple(tokens),
        hidden=hidden,
        topk=topk,
        experts=experts,
        wires=tuple(wires),
        backends=backends,
        num_sms=sms[0] if sms else None,
        num_sms_sweep=tuple(dict.fromkeys(sms)) if len(set(sms)) > 1 else (),
        compression=_compression(args.compression),
        compression_ratio=args.compression_ratio,
        iters=iters,
        warmup=warmup,
        routing=args.skew,
        workload="low-latency" if low_latency else "sweep" if args.sweep else "normal",
        baselines=not args.no_baselines,
        seed=args.seed,
        timeout_s=args.timeout,
        progress=not args.no_progress,
        experts_given=args.experts is not None,
        notes=tuple(notes),
    )
