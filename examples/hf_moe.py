"""Expert parallelism for a Hugging Face MoE model with deep_ep.integrations.patch_moe_model.

Run (CPU with gloo, or one GPU per rank with NCCL):

    torchrun --nproc-per-node 2 examples/hf_moe.py                       # tiny random Qwen3-MoE
    torchrun --nproc-per-node 2 examples/hf_moe.py --family gpt_oss      # or mixtral, qwen2_moe, deepseek_v3, olmoe
    torchrun --nproc-per-node 2 examples/hf_moe.py --model /path/to/model  # a checkpoint on disk

Every rank builds (or loads) the same model, patches it (each rank keeps
1/R of the experts), runs a forward/backward on its own batch, checks the
logits against an unpatched copy (random models only: they are small),
averages the gradients as data parallelism does (``average_gradients``;
not DistributedDataParallel, which would mix different ranks' experts), and
generates greedily. Rank 0 prints every rank's lines, in rank order.
"""

import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deep_ep.integrations import average_gradients, expert_parameters, patch_moe_model  # noqa: E402
from deep_ep.integrations.hf_configs import FAMILIES, moe_config  # noqa: E402


def report(line: str) -> None:
    """Print every rank's ``line`` from rank 0, in rank order (collective: every rank calls it), so that
    the ranks' output does not interleave."""
    lines = [None] * dist.get_world_size()
    dist.all_gather_object(lines, line)
    if dist.get_rank() == 0:
        print("\n".join(f"rank {r}: {text}" for r, text in enumerate(lines)), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="qwen3_moe", choices=sorted(FAMILIES))
    p.add_argument("--model", default=None, help="load this checkpoint directory instead of a random model")
    p.add_argument("--num-gpus", type=int, default=None, help="expert-parallel group size (default: world)")
    p.add_argument("--no-deep-ep", action="store_true", help="plain torch.distributed all_to_all instead")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dtype = torch.bfloat16 if cuda else torch.float32

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(dev)
        reference = None
    else:
        torch.manual_seed(0)  # the same weights on every rank
        config = moe_config(args.family, hidden=64, layers=2, experts=4 * world, initializer_range=0.1)
        model = AutoModelForCausalLM.from_config(config).to(dev, dtype)
        reference = copy.deepcopy(model)
    total = sum(p.numel() for _, p in expert_parameters(model))

    patch_moe_model(model, num_gpus=args.num_gpus, use_deep_ep=not args.no_deep_ep)
    info = model.deep_ep_info
    mine = sum(p.numel() for _, p in expert_parameters(model))
    report(
        f"{len(info.blocks)} MoE blocks ({info.families[0]}), EP group of {info.size}, expert parameters {mine} of {total}"
    )

    # Forward/backward on this rank's own batch.
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(3, vocab, (2, 16), generator=g).to(dev)
    out = model(ids, labels=ids)
    out.loss.backward()
    average_gradients(model)  # data parallelism: replicated params over all ranks, experts over replicas
    grads = sum(1 for p in model.parameters() if p.grad is not None)
    report(f"loss {out.loss.item():.4f}, {grads} parameters got gradients")
    if reference is not None:
        with torch.no_grad():
            err = (model(ids).logits.float() - reference(ids).logits.float()).abs().max().item()
        report(f"max |logits - unpatched logits| = {err:.2e}")

    # Greedy generation; ranks hold different prompts, synced_gpus keeps them stepping together.
    with torch.no_grad():
        gen = model.generate(
            ids[:, :8],
            attention_mask=torch.ones_like(ids[:, :8]),
            max_new_tokens=8,
            do_sample=False,
            synced_gpus=True,
            pad_token_id=model.config.pad_token_id or 0,
        )
    report(f"generated {gen[0, 8:].tolist()}")
    dist.barrier()  # every rank done before any tears its process group down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
