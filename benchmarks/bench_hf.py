"""Forward+backward throughput of a random Hugging Face MoE model under expert parallelism.

    torchrun --nproc-per-node 2 benchmarks/bench_hf.py --json benchmarks/results/DATE-CARD-hf.json
    torchrun --nproc-per-node 2 benchmarks/bench_hf.py --small --json /tmp/bench_hf.json     # CPU, tiny shapes

Model: Qwen3-MoE shape (hidden 2048, 64 experts, top-8, expert intermediate
768, 4 layers, 16 heads, vocab 32000), random weights, bf16 on GPU; 8192
tokens per rank (4 x 2048), each rank its own batch. Modes:

- ``deep_ep``: :func:`deep_ep.integrations.patch_moe_model` (tokens move with deep_ep.Buffer, ``--backend``);
- ``deep_ep_nvlink``: the same on the nvlink backend (GPUs of one host only);
- ``all_to_all``: the same with ``use_deep_ep=False`` (plain torch.distributed all_to_all_single);
- ``hf_ep``: transformers' own expert parallelism (``from_pretrained(distributed_config=...)``) where the
  installed version has it: ``DistributedConfig(fsdp_size=R, ep_size=R, ep_implementation='all_to_all')``
  (5.21+; dense weights FSDP-sharded, as it requires) or ``DistributedConfig(tp_size=R,
  enable_expert_parallel=True)`` (older 5.x; every rank computes the same batch);
- ``hf_ep_deep_ep``: transformers' expert parallelism with ``ep_implementation='deep_ep'`` (5.21+).

Time per step is the slowest rank's, median over ``--iters`` steps after
``--warmup``; ``tokens_per_s`` counts distinct tokens of the whole group per
second. Writes ``--json`` (with the card name) on rank 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deep_ep.bench.launch import local_rank  # noqa: E402
from deep_ep.integrations import expert_parameters, patch_moe_model  # noqa: E402
from deep_ep.integrations.hf_configs import moe_config  # noqa: E402

MODES = ("deep_ep", "deep_ep_nvlink", "all_to_all", "hf_ep", "hf_ep_deep_ep")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="HF MoE forward+backward throughput under expert parallelism")
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--family", default="qwen3_moe")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--experts", type=int, default=None)
    p.add_argument("--topk", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None, help="per-expert intermediate size")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank per step")
    p.add_argument("--seq", type=int, default=None, help="sequence length (tokens = batch x seq)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--backend", default="auto", help="deep_ep.Buffer backend for the deep_ep mode")
    p.add_argument(
        "--experts-implementation",
        default=None,
        help="transformers experts implementation (default: transformers' choice, e.g. grouped_mm)",
    )
    p.add_argument("--tmpdir", default=None, help="where hf_ep modes save the random checkpoint (default: /tmp)")
    a = p.parse_args(argv)
    big = dict(
        hidden=2048,
        experts=64,
        topk=8,
        intermediate=768,
        layers=4,
        heads=16,
        vocab=32000,
        tokens=8192,
        seq=2048,
        iters=10,
        warmup=3,
    )
    small = dict(
        hidden=64,
        experts=8,
        topk=2,
        intermediate=32,
        layers=2,
        heads=4,
        vocab=256,
        tokens=64,
        seq=32,
        iters=3,
        warmup=1,
    )
    for k, v in (small if a.small else big).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in a.modes if m not in MODES]
    if bad:
        p.error(f"unknown modes {bad}; choose from {MODES}")
    if a.tokens % a.seq:
        p.error("--tokens must be a multiple of --seq")
    return a


def config(a):
    return moe_config(
        a.family,
        hidden=a.hidden,
        layers=a.layers,
        experts=a.experts,
        topk=a.topk,
        intermediate=a.intermediate,
        heads=a.heads,
        kv_heads=max(1, a.heads // 4),
        vocab=a.vocab,
        max_positions=max(a.seq, 128),
    )


def build(a, dev, dtype):
    from transformers import AutoModelForCausalLM

    kw = dict(dtype=dtype)
    if a.experts_implementation:
        kw["experts_implementation"] = a.experts_implementation
    torch.manual_seed(0)  # the same weights on every rank
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config(a), **kw)
    return model


def hf_distributed_config(world, implementation):
    """transformers' own EP config for this version: (DistributedConfig, every rank shares one batch?, text)."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return None, False, "transformers.distributed.DistributedConfig not available"
    fields = {f.name for f in dataclasses.fields(DistributedConfig)}
    if "ep_size" in fields and "ep_implementation" in fields:
        cfg = DistributedConfig(fsdp_size=world, ep_size=world, ep_implementation=implementation)
        return (
            cfg,
            False,
            (
                f"DistributedConfig(fsdp_size={world}, ep_size={world}, "
                f"ep_implementation={implementation!r}); dense weights FSDP-sharded"
            ),
        )
    if implementation != "all_to_all":
        return None, False, "this transformers has no ep_implementation registry"
    if "enable_expert_parallel" in fields:
        cfg = DistributedConfig(tp_size=world, enable_expert_parallel=True)
        return (
            cfg,
            True,
            (f"DistributedConfig(tp_size={world}, enable_expert_parallel=True); every rank computes the same batch"),
        )
    return None, False, "this transformers has no expert parallelism in DistributedConfig"


def make_batch(a, rank, dev, vocab):
    g = torch.Generator().manual_seed(1234 + rank)
    ids = torch.randint(3, vocab, (a.tokens // a.seq, a.seq), generator=g)
    return ids.to(dev)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_steps(model, ids, a, dev):
    """Median over steps of the slowest rank's forward+backward time (seconds)."""
    times = []
    for i in range(a.warmup + a.iters):
        model.zero_grad(set_to_none=True)
        dist.barrier()
        sync(dev)
        t0 = time.perf_counter()
        loss = model(ids, labels=ids).loss
        loss.backward()
        sync(dev)
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=dev)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        if i >= a.warmup:
            times.append(float(dt.item()))
    model.zero_grad(set_to_none=True)
    return statistics.median(times), times


def run_mode(mode, a, rank, world, dev, dtype, ckpt):
    from transformers import AutoModelForCausalLM

    row = dict(mode=mode)
    shares_batch = False
    if mode in ("deep_ep", "deep_ep_nvlink", "all_to_all"):
        use = mode != "all_to_all"
        backend = "nvlink" if mode == "deep_ep_nvlink" else a.backend
        if mode == "deep_ep_nvlink" and dev.type != "cuda":
            row["skipped"] = "the nvlink backend needs CUDA"
            return row
        model = build(a, dev, dtype)
        patch_moe_model(model, use_deep_ep=use, backend=backend)
        row["setup"] = f"patch_moe_model(use_deep_ep={use}" + (f", backend={backend!r})" if use else ")")
        if use:
            row["buffer_backend"] = model.deep_ep_info.buffer.backend
    else:
        cfg, shares_batch, text = hf_distributed_config(world, "all_to_all" if mode == "hf_ep" else "deep_ep")
        row["setup"] = text
        if cfg is None:
            row["skipped"] = text
            return row
        if mode == "hf_ep_deep_ep":
            from deep_ep.integrations.hf_ep import register_ep_implementation

            register_ep_implementation(backend=a.backend)
        kw = dict(distributed_config=cfg, dtype=dtype)
        if a.experts_implementation:
            kw["experts_implementation"] = a.experts_implementation
        model = AutoModelForCausalLM.from_pretrained(ckpt, **kw)
    model.train()
    experts_mine = sum(
        p.numel() if not hasattr(p, "to_local") else p.to_local().numel() for _, p in expert_parameters(model)
    )
    ids = make_batch(a, 0 if shares_batch else rank, dev, a.vocab)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    med, times = time_steps(model, ids, a, dev)
    distinct = ids.numel() * (1 if shares_batch else world)
    row.update(
        step_ms=med * 1e3,
        step_ms_all=[t * 1e3 for t in times],
        tokens_per_step=distinct,
        tokens_per_s=distinct / med,
        every_rank_same_batch=shares_batch,
        expert_params_per_rank=experts_mine,
    )
    if dev.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    del model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None):
    a = parse_args(argv)
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    cuda = torch.cuda.is_available() and not a.small
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        dev = torch.device("cuda", local_rank(rank) % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32

    ckpt = None
    if any(m.startswith("hf_ep") for m in a.modes):
        # transformers' own EP shards at load time: save the same random model once and load it on every rank.
        base = tempfile.mkdtemp(prefix="bench_hf_", dir=a.tmpdir) if rank == 0 else None
        holder = [base]
        dist.broadcast_object_list(holder, src=0)
        ckpt = holder[0]
        if rank == 0:
            m = build(a, dev, dtype)
            m.save_pretrained(ckpt)
            del m
        dist.barrier()

    rows = []
    for mode in a.modes:
        try:
            row = run_mode(mode, a, rank, world, dev, dtype, ckpt)
        except Exception as e:  # one mode failing must not lose the others
            row = dict(mode=mode, error=f"{type(e).__name__}: {e}")
            if rank == 0:
                traceback.print_exc()
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        rows.append(row)
        if rank == 0:
            if "tokens_per_s" in row:
                print(
                    f"{mode:>14}: {row['step_ms']:9.2f} ms/step  {row['tokens_per_s']:12.0f} tokens/s  "
                    f"({row['setup']})",
                    flush=True,
                )
            else:
                print(f"{mode:>14}: {row.get('skipped') or row.get('error')}", flush=True)
        dist.barrier()

    if rank == 0:
        if ckpt:
            shutil.rmtree(ckpt, ignore_errors=True)
        import deep_ep

        result = dict(
            benchmark="hf_moe_forward_backward",
            date=datetime.date.today().isoformat(),
            card=torch.cuda.get_device_name(dev) if cuda else f"cpu ({platform.processor() or platform.machine()})",
            world_size=world,
            dtype=str(dtype).replace("torch.", ""),
            torch=torch.__version__,
            transformers=transformers.__version__,
            deep_ep=getattr(deep_ep, "__version__", "?"),
            model=dict(
                family=a.family,
                hidden=a.hidden,
                experts=a.experts,
                topk=a.topk,
                expert_intermediate=a.intermediate,
                layers=a.layers,
                heads=a.heads,
                vocab=a.vocab,
                experts_implementation=a.experts_implementation or "transformers default",
            ),
            tokens_per_rank=a.tokens,
            seq=a.seq,
            iters=a.iters,
            warmup=a.warmup,
            timing="slowest rank per step, median over iters; tokens_per_s = distinct tokens of the group / step",
            results=rows,
        )
        if a.json:
            os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
            with open(a.json, "w") as f:
                json.dump(result, f, indent=2)
            print(f"wrote {a.json}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
