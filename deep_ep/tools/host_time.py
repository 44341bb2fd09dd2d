"""``host-time``: host time per call of the nvlink transport's two paths, ``host`` against ``fused``.

For each path (``DEEP_EP_NVLINK_PATH``) and each call (a fresh dispatch = ``get_dispatch_layout`` +
``dispatch``; a ``num_worst_tokens`` fresh dispatch; a cached dispatch; a combine) rank 0 prints the
median over ``--repeats`` timings of ``--calls`` calls each (the two paths timed in turns) of:

- ``host us``: time the calls keep the Python thread, per call, less the time Triton's interpreter spent
  running kernels (on CPU the fused path's kernels run interpreted inside the call, and the host path's
  device work as the kernels' torch twins, at tiny shapes about a launch's cost per op; on a GPU the
  kernels are asynchronous and this subtracts nothing). On a GPU the fused fresh dispatch's one wait (its notify kernel's count) is host
  time: the call cannot return sooner;
- ``wall us``: the same until the device finished too (``torch.cuda.synchronize`` after the calls);
- ``launches`` (Triton launches through :class:`deep_ep.kernels.launch.Launcher` per call) and ``aten
  ops`` (ops a ``TorchDispatchMode`` sees per call, those inside interpreted kernels excluded).

On CPU the interpreter's own cost leaks into any timing of a call (allocations and caches it leaves
behind), so by default (``--stub``, one rank) the fused path's kernels run interpreted during the warm-up
calls and are then replaced by a replay: the notify's launch writes the block it wrote last (with this
call's ticket and header) into the pinned memory the host spins on (timed as device work), the other
launches do nothing, and the transport takes its GPU launch branch (no interpreter watchdog). The host
then does what it does on a GPU, and costs what its Python costs; a lean launch's own few microseconds on
a GPU are not in the figure (the launch count is). The host path runs its device work
as torch ops on tiny shapes, about what its launches would cost on a GPU.

Where it runs: CUDA ranks on their own GPUs (NCCL), ranks sharing fewer GPUs (a gloo group carrying CUDA
tensors, torch symmetric memory between processes of one GPU: timings of waits are then not
representative), or CPU ranks (gloo, the transport emulated
in shared memory, kernels under the interpreter: a proxy of the host cost, not a GPU figure). ``--json``
writes every figure with the machine and versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from deep_ep.bench.launch import launch

CALLS = ("fresh", "fresh worst", "cached", "combine")


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _init(rank: int, world: int, cpu: bool, port: int) -> torch.device:
    if not cpu and torch.cuda.is_available():
        n = torch.cuda.device_count()
        torch.cuda.set_device(rank % n)
        dev = torch.device("cuda", rank % n)
        # one GPU per rank, and >= 2 of them (the nvlink transport's own check), else ranks sharing one
        backend = "nccl" if n >= max(world, 2) else "cpu:gloo,cuda:gloo"
    else:
        torch.set_num_threads(1)
        dev, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    if dev.type == "cpu":
        os.environ["DEEP_EP_NVLINK_EMULATE"] = "1"
    return dev


class _Replay:
    """Stub of :class:`deep_ep.kernels.launch.Launcher` calls for the CPU proxy (see the module docstring):
    records the notify's block, then replays it."""

    def __init__(self):
        from deep_ep.kernels import launch

        self.launch = launch
        self.original = launch.Launcher.launch
        self.block = None

    def record(self):
        replay = self
        original = self.original

        def call(launcher, grid, args, bound):
            original(launcher, grid, args, bound)
            if launcher.fn.__name__ == "_notify_kernel":
                replay.block = args[4].clone()

        self.launch.Launcher.launch = call

    def stub(self):
        """Replay from now on (:attr:`deep_ep.kernels.launch.Launcher.replay`: the transport then takes its
        GPU launch branch, no interpreter watchdog)."""
        from deep_ep.agreement import _HEADER
        from deep_ep.kernels.protocol import OUT_DONE, OUT_HEADERS

        replay = self
        block = self.block.numpy() if self.block is not None else None  # (no notify: cached, combine)
        views = {}  # the pinned ring's slots as numpy (what a kernel's stores cost the host: nothing)

        stats = replay.launch.STATS

        notify = {}  # launcher -> whether it is the notify's (asked once: a name lookup costs a property call)

        def call(launcher, grid, args, bound):  # (Launcher.launch counted it)
            is_notify = notify.get(launcher)
            if is_notify is None:
                is_notify = notify[launcher] = launcher.fn.__name__ == "_notify_kernel"
            if is_notify:
                t0 = time.perf_counter()  # the kernel's stores: device work (subtracted as the interpreter's is)
                key = (args[3].data_ptr(), args[4].data_ptr())
                if key not in views:
                    views[key] = (args[3].numpy(), args[4].numpy())
                inp, out = views[key]
                out[:] = block
                out[OUT_HEADERS : OUT_HEADERS + _HEADER] = inp[:_HEADER]
                out[OUT_DONE] = inp[_HEADER]
                stats.device_s += time.perf_counter() - t0

        self.launch.Launcher.launch = self.original
        self.launch.Launcher.replay = call

    def restore(self):
        self.launch.Launcher.launch = self.original
        self.launch.Launcher.replay = None


def _calls(buf, x, idx, w, E, worst):
    """The timed calls of one Buffer: a fresh dispatch (layout included), a ``num_worst_tokens`` one, a cached
    dispatch and a combine of the first fresh dispatch's handle."""

    def fresh(num_worst=0):
        _, _, pe, in_rank, _ = buf.get_dispatch_layout(idx, E)
        return buf.dispatch(
            x,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=pe,
            topk_idx=idx,
            topk_weights=w,
            num_worst_tokens=num_worst,
        )

    rx, _, rw, _, h, _ = fresh()
    return {
        "fresh": fresh,
        "fresh worst": lambda: fresh(worst),
        "cached": lambda: buf.dispatch(x, handle=h),
        "combine": lambda: buf.combine(rx, h, topk_weights=rw),
    }


def _rank(rank: int, world: int, args, port: int, path) -> None:
    dev = _init(rank, world, args.cpu, port)
    import deep_ep
    from deep_ep.bench.environment import machine, versions
    from deep_ep.kernels.launch import STATS

    T, H, E, K = args.tokens, args.hidden, args.experts, args.topk
    g = torch.Generator().manual_seed(7 + rank)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16).to(dev)
    idx = torch.rand(T, E, generator=g).topk(K, dim=1).indices.to(dev)
    w = torch.rand(T, K, generator=g).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    setups = {}
    for p in args.paths:
        # on CPU the fused path's kernels run interpreted (or replayed); the host path's device work runs as
        # the kernels' torch twins (tiny shapes: each op costs about what a launch would)
        env = {"DEEP_EP_NVLINK_PATH": p, "DEEP_EP_KERNELS_ON_CPU": "1" if dev.type == "cpu" and p == "fused" else "0"}
        os.environ.update(env)
        buf = deep_ep.Buffer(dist.group.WORLD, backend="nvlink", num_nvl_bytes=args.staging_mb << 20)
        setups[p] = (env, buf, _calls(buf, x, idx, w, E, world * T))
    for name in CALLS:
        replay = None
        for p, (env, _buf, calls) in setups.items():
            os.environ.update(env)
            if args.stub and p == "fused" and dev.type == "cpu":
                replay = _Replay()
                replay.record()
            for _ in range(3):
                calls[name]()
            sync()
        if replay:
            replay.stub()
        times = {p: ([], [], []) for p in setups}
        for _ in range(args.repeats):  # the paths in turns, so a change of the machine's load hits both
            for p, (env, _buf, calls) in setups.items():
                os.environ.update(env)
                fn = calls[name]
                dist.barrier()
                sync()
                STATS.reset()
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                t1 = time.perf_counter()
                sync()
                t2 = time.perf_counter()
                host, wall, launches = times[p]
                host.append((t1 - t0 - STATS.device_s) / args.calls * 1e6)
                wall.append((t2 - t0 - STATS.device_s) / args.calls * 1e6)
                launches.append(STATS.launches / args.calls)
        for p, (env, _buf, calls) in setups.items():
            os.environ.update(env)
            ops = _Ops()
            with ops:
                calls[name]()
            sync()
            host, wall, launches = times[p]
            rows.append(
                dict(
                    path=p,
                    call=name,
                    host_us=statistics.median(host),
                    host_us_min=min(host),
                    wall_us=statistics.median(wall),
                    launches=statistics.median(launches),
                    aten_ops=ops.n,
                    kernels=("replayed" if replay else "interpreted")
                    if dev.type == "cpu" and p == "fused"
                    else ("run" if dev.type == "cuda" else "torch twins"),
                )
            )
        if replay:
            replay.restore()
    for _env, buf, _calls_of in setups.values():
        buf.destroy()
    dist.barrier()
    if rank == 0:
        where = (
            f"{torch.cuda.get_device_name(dev)} x{torch.cuda.device_count()}, {dist.get_backend()}"
            if dev.type == "cuda"
            else "CPU ranks, emulated nvlink, " + ("fused kernels replayed" if args.stub else "kernels interpreted")
        )
        print(
            f"--- host-time: world={world} T={T} H={H} E={E} K={K} bf16 ({where}); median of {args.repeats} x "
            f"{args.calls} calls",
            flush=True,
        )
        print(f"{'path':6s} {'call':12s} {'host us':>9s} {'wall us':>9s} {'launches':>9s} {'aten ops':>9s}")
        for r in rows:
            print(
                f"{r['path']:6s} {r['call']:12s} {r['host_us']:9.1f} {r['wall_us']:9.1f} {r['launches']:9.1f} "
                f"{r['aten_ops']:9d}",
                flush=True,
            )
        by = {(r["path"], r["call"]): r for r in rows}
        if "host" in args.paths and "fused" in args.paths:
            for c in CALLS:
                ratio = by[("host", c)]["host_us"] / max(by[("fused", c)]["host_us"], 1e-9)
                print(f"host / fused, {c}: {ratio:.1f}x", flush=True)
        if path:
            with open(path, "w") as f:
                json.dump(
                    dict(
                        tool="host-time",
                        where=where,
                        world=world,
                        shape=dict(tokens=T, hidden=H, experts=E, topk=K, dtype="bfloat16"),
                        repeats=args.repeats,
                        calls=args.calls,
                        rows=rows,
                        machine=machine(),
                        versions=versions(),
                    ),
                    f,
                    indent=1,
                )
    dist.barrier()
    dist.destroy_process_group()


def main(argv, prog: str = "deep-ep tools host-time") -> int:
    """Run the tool.

    Args:
        argv: its arguments (``--help`` lists them).
        prog: its name in usage lines.

    Returns:
        The exit status.
    """
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__.split(": ", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--world", type=int, default=None, help="ranks (default 2; 1 on CPU, where --stub needs one)")
    p.add_argument("--cpu", action="store_true", help="CPU ranks even where CUDA is available")
    p.add_argument("--paths", nargs="+", choices=("host", "fused"), default=["host", "fused"], help="paths to time")
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank (default 4096 on CUDA, 32 on CPU)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default 7168 on CUDA, 64 on CPU)")
    p.add_argument("--experts", type=int, default=None, help="experts (default 256 on CUDA, 16 on CPU)")
    p.add_argument("--topk", type=int, default=None, help="experts per token (default 8 on CUDA, 4 on CPU)")
    p.add_argument("--staging-mb", type=int, default=None, help="symmetric staging per rank, MiB")
    p.add_argument("--repeats", type=int, default=7, help="timings per call, median reported (default 7)")
    p.add_argument("--calls", type=int, default=None, help="calls per timing (default 20 on CUDA, 100 on CPU)")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument(
        "--no-stub", dest="stub", action="store_false", help="on CPU, time the interpreted kernels' calls (noisy)"
    )
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not a.cpu
    if a.world is None:
        a.world = 2 if cuda else 1
    a.stub = a.stub and not cuda
    if a.stub and a.world != 1:
        p.error("--stub (the CPU default) replays one rank's notify: use --world 1, or --no-stub")
    for name, on_gpu, on_cpu in (
        ("tokens", 4096, 32),
        ("hidden", 7168, 64),
        ("experts", 256, 16),
        ("topk", 8, 4),
        ("calls", 20, 100),
        ("staging_mb", 1024, 16),
    ):
        if getattr(a, name) is None:
            setattr(a, name, on_gpu if cuda else on_cpu)
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before the ranks import Triton
    elif torch.cuda.device_count() < a.world:
        os.environ.setdefault("TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES", "1")  # ranks sharing a GPU
    launch(_rank, (a.world, a), a.json, a.world, "cuda" if cuda else "cpu", fork_ok=False)
    return 0
