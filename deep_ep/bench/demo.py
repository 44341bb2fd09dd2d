"""``deep-ep demo``: train a small MoE transformer on synthetic data with three communication setups.

Every local GPU (NCCL) or 2 CPU ranks (gloo) train the same model (token
embedding, ``--layers`` residual blocks of RMSNorm + :class:`ExpertParallelMoE`,
RMSNorm, LM head) for ``--steps`` steps on a synthetic next-token task that
can be learned (``t[i+1] = (5 t[i] + 3) mod vocab``, 10% of the tokens
random), with

- ``collective``: the layer over the torch.distributed all-to-all path
  (``backend='collective'``), no overlap;
- ``deep_ep``: the layer over ``backend='auto'`` (nvlink on one host of 2
  GPUs), no overlap;
- ``deep_ep-overlap``: the same with ``--chunks`` chunks (communication of one
  chunk overlapped with the experts of another).

It prints tokens/s, the loss, and the share of the MoE forward the compute
stream spent waiting for communication, and writes a JSON result and a PNG
chart (matplotlib). Replicated parameters (embedding, router, norms, head)
are averaged across ranks each step, as data parallelism does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import sys
import tempfile
import time
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from deep_ep.bench.launch import init_rank, launch

SETUPS = ("collective", "deep_ep", "deep_ep-overlap")


class DemoError(RuntimeError):
    """The demo cannot run as asked (a backend that cannot run here); the message says why."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``deep-ep demo`` options (defaults: small on CPU, a DeepSeek-like layer scaled down on GPU).

    Args:
        p: the parser.
    """
    p.add_argument("--steps", type=int, help="training steps per setup (GPU 30, CPU 20)")
    p.add_argument("--layers", type=int, default=2, help="MoE blocks (default 2)")
    p.add_argument("--hidden", type=int, help="model width (GPU 2048, CPU 64)")
    p.add_argument("--ffn", type=int, help="expert width (GPU 1024, CPU 32)")
    p.add_argument("--experts", type=int, help="experts per layer (GPU 64, CPU 8)")
    p.add_argument("--topk", type=int, help="experts per token (GPU 8, CPU 2)")
    p.add_argument(
        "--tokens", type=int, help="tokens per rank per step, rounded down to sequences of 16 (GPU 4096, CPU 128)"
    )
    p.add_argument("--chunks", type=int, default=4, help="chunks of the overlapped setup (default 4)")
    p.add_argument("--vocab", type=int, default=64, help="vocabulary of the synthetic task (default 64)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="GPUs over NCCL or CPU ranks over gloo")
    p.add_argument("--world-size", type=int, help="ranks (GPU: all local GPUs, CPU: 2)")
    p.add_argument("--setups", default=",".join(SETUPS), help=f"comma list of {', '.join(SETUPS)}")
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "collective", "nvlink", "hierarchical"),
        help="the deep_ep setups' transport (default auto; the collective setup is always collective)",
    )
    p.add_argument(
        "--lr",
        type=float,
        help="AdamW learning rate (default 1e-2 * min(1, 1024 / hidden): wider models diverge at 1e-2)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--json",
        metavar="FILE",
        default="deep_ep_demo.json",
        help="write the result here (default deep_ep_demo.json; '' for none)",
    )
    p.add_argument(
        "--png",
        metavar="FILE",
        default="deep_ep_demo.png",
        help="write a chart here (needs matplotlib; default deep_ep_demo.png; '' for none)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


class _Block(nn.Module):
    def __init__(self, hidden, ffn, experts, topk, group, backend, chunks, dtype, device):
        super().__init__()
        from deep_ep.moe import ExpertParallelMoE

        self.norm = nn.RMSNorm(hidden, dtype=dtype, device=device)
        self.moe = ExpertParallelMoE(
            hidden,
            ffn,
            experts,
            topk,
            group=group,
            num_shared_experts=1,
            num_chunks=chunks,
            backend=backend,
            record_stats=True,
            dtype=dtype,
            device=device,
        )

    def forward(self, x):
        return x + self.moe(self.norm(x))


class DemoModel(nn.Module):
    """Embedding, MoE blocks, norm, LM head (the demo's model).

    Args:
        cfg: the demo's settings (``vocab``, ``hidden``, ``ffn``, ``experts``, ``topk``, ``layers``).
        backend: the MoE layers' transport.
        chunks: their ``num_chunks``.
        device, dtype: where and in what the parameters live.
    """

    def __init__(self, cfg, backend: str, chunks: int, device, dtype):
        super().__init__()
        self.embed = nn.Embedding(cfg["vocab"], cfg["hidden"], dtype=dtype, device=device)
        self.blocks = nn.ModuleList(
            _Block(cfg["hidden"], cfg["ffn"], cfg["experts"], cfg["topk"], None, backend, chunks, dtype, device)
            for _ in range(cfg["layers"])
        )
        self.norm = nn.RMSNorm(cfg["hidden"], dtype=dtype, device=device)
        self.head = nn.Linear(cfg["hidden"], cfg["vocab"], bias=False, dtype=dtype, device=device)

    def forward(self, tokens):
        """The model on a batch.

        Args:
            tokens: token ids ``[B, S]`` (or flat ``[N]``).

        Returns:
            Logits ``[..., vocab]``.
        """
        x = self.embed(tokens)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def _batch(cfg, step: int, rank: int, device) -> tuple:
    g = torch.Generator().manual_seed(cfg["seed"] * 7919 + step * 131 + rank)
    V, T = cfg["vocab"], cfg["tokens"]
    seq = 16
    n = max(T // seq, 1)
    t0 = torch.randint(0, V, (n, 1), generator=g)
    toks = [t0]
    for _ in range(seq):
        nxt = (5 * toks[-1] + 3) % V
        noise = torch.rand((n, 1), generator=g) < 0.1  # 10% of the tokens are random
        toks.append(torch.where(noise, torch.randint(0, V, (n, 1), generator=g), nxt))
    s = torch.cat(toks, dim=1)
    return s[:, :-1].reshape(-1).to(device), s[:, 1:].reshape(-1).to(device)


def _backend_error(backend: str) -> Optional[str]:
    """Whether a Buffer of ``backend`` can be made on the default group, agreed by every rank.

    Returns:
        ``None``, or the first rank's error (naming it) followed by the transport's support check.
    """
    import deep_ep
    from deep_ep.bench.cases import open_agreed
    from deep_ep.bench.worker import with_support_reason

    buf, reason = open_agreed(lambda: deep_ep.Buffer(dist.group.WORLD, backend=backend))
    if buf is not None:
        buf.destroy()
    return with_support_reason(backend, reason, dist.group.WORLD) if reason else None


def _rank(rank: int, cfg: dict, port: int, path: str) -> None:
    cuda = cfg["device"] == "cuda"
    device = init_rank(rank, cfg["world_size"], cfg["device"], port)
    backends = dict.fromkeys("collective" if s == "collective" else cfg.get("backend", "auto") for s in cfg["setups"])
    for backend in backends:  # before any training: a backend that cannot run here ends the demo at once
        error = _backend_error(backend)
        if error:
            if rank == 0:
                with open(path, "wb") as f:
                    pickle.dump(dict(error=f"--backend {backend} cannot run on these ranks: {error}"), f)
            dist.barrier()
            dist.destroy_process_group()
            return
    dtype = torch.bfloat16 if cuda else torch.float32
    results = {}
    bar = None
    if rank == 0 and cfg["progress"]:
        try:
            from tqdm import tqdm

            bar = tqdm(
                total=cfg["steps"] * len(cfg["setups"]),
                desc="deep-ep demo",
                unit="step",
                file=sys.stderr,
                leave=False,
                disable=None,
            )
        except ImportError:
            bar = None
    for setup in cfg["setups"]:
        torch.manual_seed(cfg["seed"])
        backend = "collective" if setup == "collective" else cfg.get("backend", "auto")
        chunks = cfg["chunks"] if setup == "deep_ep-overlap" else 1
        model = DemoModel(cfg, backend, chunks, device, dtype)
        g = torch.Generator(device=device).manual_seed(cfg["seed"] * 1000 + 1 + rank)  # each rank its own experts
        with torch.no_grad():
            for b in model.blocks:
                for w, fan in ((b.moe.w_gate_up, cfg["hidden"]), (b.moe.w_down, cfg["ffn"])):
                    w.copy_(torch.randn(w.shape, generator=g, device=device, dtype=torch.float32) / fan**0.5)
        replicated = [p for n_, p in model.named_parameters() if "w_gate_up" not in n_ and "w_down" not in n_]
        experts = [p for n_, p in model.named_parameters() if "w_gate_up" in n_ or "w_down" in n_]
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
        losses: List[float] = []
        times, exposed, moe_fwd = [], [], []
        for step in range(cfg["steps"]):
            x, y = _batch(cfg, step, rank, device)
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            logits = model(x)
            loss = nn.functional.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p in replicated:  # data-parallel average of replicated parameters
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= cfg["world_size"]
            for p in experts:  # their gradients already sum over every rank's tokens
                if p.grad is not None:
                    p.grad /= cfg["world_size"]
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(loss.detach().item())
            # each MoE layer's forward and backward: its share of the training step
            st = [
                b.moe.stats + b.moe.backward_stats
                for b in model.blocks
                if b.moe.stats is not None and b.moe.backward_stats is not None
            ]
            exposed.append(sum(s.exposed_comm_us for s in st))
            moe_fwd.append(sum(s.step_us for s in st))
            if bar is not None:
                bar.update(1)
        warm = max(1, len(times) // 4)  # the first steps compile and warm caches
        t = sum(times[warm:]) / max(len(times) - warm, 1)
        results[setup] = dict(
            step_s=t,
            tokens_per_s=int(x.numel()) * cfg["world_size"] / t,
            losses=losses,
            exposed_comm_us=sum(exposed[warm:]) / max(len(exposed) - warm, 1),
            moe_step_us=sum(moe_fwd[warm:]) / max(len(moe_fwd) - warm, 1),
            transport=model.blocks[0].moe.buffer.backend,
        )
        del model, opt
    if bar is not None:
        bar.close()
    gathered = [None] * cfg["world_size"]
    dist.all_gather_object(gathered, results)
    if rank == 0:
        card = torch.cuda.get_device_name(device) if cuda else "cpu"
        with open(path, "wb") as f:
            pickle.dump(dict(ranks=gathered, card=card), f)
    dist.barrier()
    dist.destroy_process_group()


def run(cfg: dict) -> dict:
    """Spawn the ranks and train every setup.

    Args:
        cfg: the settings (:func:`config_from_args`).

    Returns:
        The result object (also what ``--json`` writes).

    Raises:
        DemoError: a setup's backend cannot run on these ranks (found before any training).
    """

    with tempfile.TemporaryDirectory(prefix="deep_ep_demo_") as tmp:
        path = os.path.join(tmp, "raw.pkl")
        launch(_rank, (cfg,), path, cfg["world_size"], cfg["device"], fork_ok=False)
        with open(path, "rb") as f:
            raw = pickle.load(f)
    if "error" in raw:
        raise DemoError(raw["error"])
    rows = []
    for setup in cfg["setups"]:
        per = [r[setup] for r in raw["ranks"]]
        step = max(p["step_s"] for p in per)
        exposed = max(p["exposed_comm_us"] for p in per)
        fwd = max(p["moe_step_us"] for p in per)
        rows.append(
            dict(
                setup=setup,
                transport=per[0]["transport"],
                step_ms=step * 1e3,
                tokens_per_s=cfg["tokens"] * cfg["world_size"] / step,  # cfg["tokens"]: a multiple of 16
                loss_first=per[0]["losses"][0],
                loss_last=per[0]["losses"][-1],
                losses=per[0]["losses"],
                moe_step_us=fwd,
                exposed_comm_us=exposed,
                exposed_comm_fraction=exposed / fwd if fwd else 0.0,
            )
        )
    return dict(
        workload="demo",
        card=raw["card"],
        num_ranks=cfg["world_size"],
        date=datetime.date.today().isoformat(),
        torch=torch.__version__,
        config={k: v for k, v in cfg.items() if k not in ("progress",)},
        rows=rows,
    )


def format_result(res: dict) -> str:
    """The demo result as a text table (one row per setup).

    Args:
        res: what :func:`run` returns.

    Returns:
        The table.
    """
    out = [
        f"deep-ep demo on {res['num_ranks']} x {res['card']}: {res['config']['layers']} MoE layers, "
        f"{res['config']['experts']} experts top-{res['config']['topk']}, {res['config']['tokens']} tokens/rank, "
        f"{res['config']['steps']} steps",
        f"{'setup':18s} {'transport':10s} {'step ms':>9s} {'tokens/s':>10s} {'loss':>15s} {'exposed comm':>13s}",
    ]
    for r in res["rows"]:
        out.append(
            f"{r['setup']:18s} {r['transport']:10s} {r['step_ms']:9.1f} {r['tokens_per_s']:10.0f} "
            f"{r['loss_first']:6.3f} -> {r['loss_last']:5.3f} {100 * r['exposed_comm_fraction']:12.1f}%"
        )
    out.append(
        "exposed comm: share of the MoE layers' forward + backward time in which the compute stream waited "
        "for communication"
    )
    return "\n".join(out)


#: line style and marker of each setup's loss curve: the setups train to (nearly) the same losses, so
#: their curves lie on top of each other, and only distinct styles keep every one visible
CURVE_STYLES = {
    "collective": dict(linestyle="-", marker="o", linewidth=2.5, alpha=0.6),
    "deep_ep": dict(linestyle="--", marker="s", linewidth=1.8),
    "deep_ep-overlap": dict(linestyle=":", marker="^", linewidth=1.8),
}


def plot_losses(ax, rows: list) -> None:
    """Draw each setup's loss against the training step (1, 2, ...) on the matplotlib axes ``ax``.

    Every setup has its own line style and marker, its markers on steps of its own (the curves often
    coincide), the legend says so, and the step axis has integer ticks.

    Args:
        ax: a matplotlib ``Axes``.
        rows: the result's ``rows`` (each with ``setup`` and ``losses``).
    """
    from matplotlib.ticker import MaxNLocator

    for i, r in enumerate(rows):
        steps = range(1, len(r["losses"]) + 1)
        style = CURVE_STYLES.get(r["setup"], {})
        # markers on every len(rows)-th step, each setup starting one step later: all stay visible
        ax.plot(steps, r["losses"], label=r["setup"], markersize=5, markevery=(i, len(rows)), **style)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(title="setup (curves coincide where the losses agree)", title_fontsize=7, fontsize=8)


def write_png(res: dict, path: str) -> Optional[str]:
    """Draw the loss curves and tokens/s of every setup into the PNG ``path``.

    Args:
        res: what :func:`run` returns.
        path: the file to write.

    Returns:
        ``path``, or ``None`` (with a message) when matplotlib is missing.
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: the process's backend stays as it is
    except ImportError:
        print("deep-ep demo: matplotlib is not installed; no chart", file=sys.stderr)
        return None
    fig = Figure(figsize=(10, 3.8))
    a, b = fig.subplots(1, 2)
    plot_losses(a, res["rows"])
    names = [r["setup"] for r in res["rows"]]
    b.bar(names, [r["tokens_per_s"] for r in res["rows"]], color=["#999999", "#4a7ab8", "#2b9e5c"][: len(names)])
    b.set_ylabel("tokens / s")
    for i, r in enumerate(res["rows"]):
        b.text(
            i,
            r["tokens_per_s"],
            f"{100 * r['exposed_comm_fraction']:.0f}% exposed",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    fig.suptitle(f"deep-ep demo, {res['num_ranks']} x {res['card']}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def config_from_args(args: argparse.Namespace) -> dict:
    """The run's settings from the parsed options (defaults per device).

    Args:
        args: the parsed ``deep-ep demo`` options (:func:`add_arguments`).

    Returns:
        The settings, a dict (picklable: it goes to every rank).

    Raises:
        ValueError: naming each rule the options break.
    """
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise ValueError("--device cuda but no GPU is visible")
    world = args.world_size if args.world_size is not None else (torch.cuda.device_count() if gpu else 2)
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    bad = [s for s in setups if s not in SETUPS]
    if bad:
        raise ValueError(f"unknown setup(s) {bad}; choose from {', '.join(SETUPS)}")
    cfg = dict(
        device=device,
        world_size=world,
        steps=args.steps if args.steps is not None else (30 if gpu else 20),
        layers=args.layers,
        hidden=args.hidden if args.hidden is not None else (2048 if gpu else 64),
        ffn=args.ffn if args.ffn is not None else (1024 if gpu else 32),
        experts=args.experts if args.experts is not None else (64 if gpu else 8),
        topk=args.topk if args.topk is not None else (8 if gpu else 2),
        tokens=max(16, (args.tokens or (4096 if gpu else 128)) // 16 * 16),
        chunks=args.chunks,
        vocab=args.vocab,
        seed=args.seed,
        lr=getattr(args, "lr", None),
        setups=setups,
        progress=not args.no_progress,
        backend=args.backend,
    )
    if cfg["lr"] is None:
        cfg["lr"] = 1e-2 * min(1.0, 1024 / cfg["hidden"])
    rules = (
        (world < 1, f"--world-size must be >= 1, got {world}"),
        (gpu and world > torch.cuda.device_count(), f"--world-size {world} but {torch.cuda.device_count()} GPUs"),
        (
            cfg["experts"] % world != 0,
            f"--experts must be a multiple of the ranks: {cfg['experts']} experts on "
            f"{world} ranks (--world-size {world}); pass --experts {world * max(1, cfg['experts'] // world)}",
        ),
        (cfg["topk"] > cfg["experts"], f"--topk {cfg['topk']} > --experts {cfg['experts']}"),
        (cfg["steps"] < 1, f"--steps must be >= 1, got {cfg['steps']}"),
        (cfg["lr"] <= 0, f"--lr must be > 0, got {cfg['lr']}"),
        (cfg["chunks"] < 1, f"--chunks must be >= 1, got {cfg['chunks']}"),
        (
            min(cfg["hidden"], cfg["ffn"], cfg["layers"], cfg["topk"]) < 1,
            "--hidden, --ffn, --layers, --topk must be >= 1",
        ),
        (cfg["vocab"] < 2, f"--vocab must be >= 2, got {cfg['vocab']}"),
    )
    broken = [msg for bad, msg in rules if bad]
    if broken:
        raise ValueError("; ".join(broken))
    return cfg


def main_from_args(args: argparse.Namespace) -> int:
    """Run the demo from parsed options: print the table, write ``--json`` / ``--png``.

    Args:
        args: the parsed options (:func:`add_arguments`).

    Returns:
        The exit status: 0; 2 for options that break a rule; 1 when a backend cannot run on the ranks.
    """
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"deep-ep demo: error: {exc}", file=sys.stderr)
        return 2
    try:
        res = run(cfg)
    except DemoError as exc:
        print(f"deep-ep demo: error: {exc}", file=sys.stderr)
        return 1
    res.setdefault("command", "deep-ep demo " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["demo"] else sys.argv[1:]))
    print(format_result(res))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.png:
        got = write_png(res, args.png)
        if got:
            print(f"wrote {got}", file=sys.stderr)
    return 0
