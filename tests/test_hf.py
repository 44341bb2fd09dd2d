"""patch_moe_model (docs/api.md, deep_ep.integrations) on tiny random Hugging Face MoE models of every supported family.

Every rank builds the same model from the same seed, keeps an unpatched copy
as the reference, patches the other and feeds it its own batch. Checked
against the reference: logits, the gradient of every parameter (for the
experts, this rank's slice of the sum over all ranks' batches, since experts
see every rank's tokens), greedy generation, and that the expert parameters
per rank are 1/R of the total.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

from deep_ep.integrations import UnsupportedMoEError, average_gradients, expert_parameters, patch_moe_model  # noqa: E402
from deep_ep.integrations.hf_configs import FAMILIES, moe_config  # noqa: E402
from tests._cases import device  # noqa: E402


def _model(family, impl=None, dtype=torch.float32, seed=0, **cfg):
    from transformers import AutoModelForCausalLM

    # A larger init than the default 0.02 so that the experts move the logits noticeably.
    config = moe_config(family, initializer_range=0.2, **cfg)
    torch.manual_seed(seed)
    kwargs = dict(attn_implementation="eager")
    if impl is not None:
        kwargs["experts_implementation"] = impl
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.to(device=device(), dtype=dtype)


def _batch(rank, vocab=128, shape=(2, 6)):
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randint(3, vocab, shape, generator=g).to(device())


def _grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def _close(a, b, what, atol, rtol):
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
        return
    a, b = a.float(), b.float()  # bf16: the error relative to the tensor's scale
    scale = b.abs().max().clamp_min(1e-6)
    err = (a - b).abs().max() / scale
    assert err <= rtol, f"{what}: max error {err:.3g} of the scale {scale:.3g} exceeds {rtol}"


def rank_family(
    rank, world, family, use_deep_ep, impl=None, num_gpus=None, dtype=torch.float32, backend="auto", check_generate=True
):
    fp32 = dtype == torch.float32
    atol, rtol = (1e-5, 1e-5) if fp32 else (3e-2, 3e-2)
    ref = _model(family, impl, dtype)
    model = copy.deepcopy(ref)
    E_total = sum(p.numel() for _, p in expert_parameters(ref))
    n_total = sum(p.numel() for p in ref.parameters())
    assert E_total > 0

    full = [weakref.ref(p) for _, p in expert_parameters(model)]
    patch_moe_model(model, num_gpus=num_gpus, use_deep_ep=use_deep_ep, backend=backend)
    gc.collect()
    assert all(w() is None for w in full), "the full expert tensors are still alive after patching"
    info = model.deep_ep_info
    R = info.size
    assert R == (num_gpus or world) and info.rank == dist.get_rank() % R
    assert len(info.blocks) >= 1 and set(info.families) == {FAMILIES[family]}
    with pytest.raises(UnsupportedMoEError, match="already patched"):
        patch_moe_model(model, num_gpus=num_gpus, use_deep_ep=use_deep_ep)

    # Expert memory per rank is 1/R of the total; everything else is unchanged.
    E_mine = sum(p.numel() for _, p in expert_parameters(model))
    assert E_mine * R == E_total, (E_mine, R, E_total)
    assert sum(p.numel() for p in model.parameters()) == n_total - E_total + E_mine

    # Reference gradients: non-expert parameters see this rank's loss only; experts see every rank's tokens.
    batches = [_batch(s) for s in range(world)]
    ids = batches[rank]
    ref_logits = ref(ids).logits
    ref_loss = ref(ids, labels=ids).loss
    ref_loss.backward()
    g_local = _grads(ref)
    for s in range(world):
        if s // R == rank // R and s != rank:  # ranks of this EP group send tokens to these experts
            ref(batches[s], labels=batches[s]).loss.backward()
    g_all = _grads(ref)

    logits = model(ids).logits
    _close(logits, ref_logits, f"{family} logits", atol, rtol)
    loss = model(ids, labels=ids).loss
    _close(loss, ref_loss, f"{family} loss", atol, rtol)
    loss.backward()
    expert_names = {n for n, _ in expert_parameters(model)}
    r = info.rank
    mine = _grads(model)
    assert set(mine) == set(g_local)
    checked_router = False
    for name, g in mine.items():
        if name in expert_names:
            L = g.size(0)
            want = g_all[name][r * L : (r + 1) * L]
        else:
            want = g_local[name]
            checked_router |= (".gate." in name or ".router." in name) and want.abs().sum() > 0
        _close(g, want, f"{family} grad of {name}", atol=1e-4 if fp32 else 0.1, rtol=1e-4 if fp32 else 0.1)
    assert checked_router, "no router gradient was compared"

    # Data-parallel averaging: every gradient becomes that of the mean of all ranks' losses.
    ref.zero_grad()
    for s in range(world):
        (ref(batches[s], labels=batches[s]).loss / world).backward()
    g_mean = _grads(ref)
    average_gradients(model)
    for name, g in _grads(model).items():
        want = g_mean[name][r * g.size(0) : (r + 1) * g.size(0)] if name in expert_names else g_mean[name]
        _close(g, want, f"{family} averaged grad of {name}", atol=1e-4 if fp32 else 0.1, rtol=1e-4 if fp32 else 0.1)

    if check_generate:
        mask = torch.ones_like(ids)
        kw = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            out = model.generate(ids, **kw)
            if fp32:
                assert torch.equal(out, ref.generate(ids, **kw)), f"{family}: greedy generation differs"
            else:
                # bf16: near-ties may flip; each token chosen must be (nearly) the reference's best at that step.
                scores = ref(out).logits[:, ids.size(1) - 1 : -1].float()
                chosen = scores.gather(-1, out[:, ids.size(1) :, None]).squeeze(-1)
                gap = scores.max(-1).values - chosen
                assert gap.max() <= 0.05 * scores.abs().max(), f"{family}: generated tokens far from greedy"
    return E_mine


@pytest.mark.parametrize("use_deep_ep", [True, False], ids=["deep_ep", "all_to_all"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_unpatched(rank_pool, family, use_deep_ep):
    rank_pool(2).run(rank_family, family, use_deep_ep)


@pytest.mark.parametrize(
    "family,impl", [("mixtral", "eager"), ("gpt_oss", "eager"), ("qwen3_moe", "batched_mm"), ("gpt_oss", "batched_mm")]
)
def test_experts_implementations(rank_pool, family, impl):
    rank_pool(2).run(rank_family, family, True, impl, None, torch.float32, "auto", False)


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_bf16_on_cpu(rank_pool, family):
    # The GPU tests' bf16 tolerances, exercised on CPU.
    rank_pool(2).run(rank_family, family, True, None, None, torch.bfloat16)


def test_ep_groups_smaller_than_world(rank_pool):
    # num_gpus=1: two groups of one rank, each holding every expert (replicated).
    rank_pool(2).run(rank_family, "qwen2_moe", True, None, 1, torch.float32, "auto", False)


def test_ep_groups_of_two_in_four_ranks(rank_pool):
    # World of 4, EP groups {0, 1} and {2, 3}: each group holds every expert once.
    rank_pool(4).run(rank_family, "deepseek_v3", True, None, 2, torch.float32, "auto", False)


def rank_idle_rank(rank, world, use_deep_ep, train):
    """Rank 1's experts are never chosen: it receives no tokens, yet backward must run its collectives."""
    ref = _model("gpt_oss")
    with torch.no_grad():
        for layer in ref.model.layers:
            layer.mlp.router.bias[2:] = -1e4  # experts 2, 3 (rank 1's) never win
    model = copy.deepcopy(ref)
    patch_moe_model(model, use_deep_ep=use_deep_ep)
    for m in (ref, model):
        for name, p in m.named_parameters():
            p.requires_grad_(train == "all" or ".experts." in name)
    batches = [_batch(s) for s in range(world)]
    ids = batches[rank]
    for s in range(world):
        ref(batches[s], labels=batches[s]).loss.backward()
    loss = model(ids, labels=ids).loss
    _close(loss, ref(ids, labels=ids).loss, "loss", 1e-5, 1e-5)
    loss.backward()
    for name, p in expert_parameters(model):
        L = p.size(0)
        want = dict(ref.named_parameters())[name].grad[rank * L : (rank + 1) * L]
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        _close(got, want, f"grad of {name}", 1e-4, 1e-4)
        assert (rank == 1) == (want.abs().sum() == 0)


@pytest.mark.parametrize("train", ["all", "experts_only"])
@pytest.mark.parametrize("use_deep_ep", [True, False], ids=["deep_ep", "all_to_all"])
def test_rank_without_tokens(rank_pool, use_deep_ep, train):
    rank_pool(2).run(rank_idle_rank, use_deep_ep, train, timeout=60)


def rank_bad_arguments(rank, world):
    model = _model("mixtral")
    with pytest.raises(ValueError, match="num_gpus"):
        patch_moe_model(model, num_gpus=3)
    with pytest.raises(ValueError, match="num_gpus"):
        patch_moe_model(model, num_gpus=4, group=dist.group.WORLD)
    odd = _model("olmoe", experts=3)
    with pytest.raises(ValueError, match="3 experts"):
        patch_moe_model(odd)


def test_bad_arguments(rank_pool):
    rank_pool(2).run(rank_bad_arguments)


def test_unsupported_models():
    from transformers import AutoModelForCausalLM

    llama4 = AutoModelForCausalLM.from_config(moe_config("llama4"))
    with pytest.raises(UnsupportedMoEError, match="Llama4TextMoe"):
        patch_moe_model(llama4)
    with pytest.raises(UnsupportedMoEError, match="Linear"):
        patch_moe_model(torch.nn.Linear(4, 4))

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])

    with pytest.raises(UnsupportedMoEError, match="Block.*ModuleList"):
        patch_moe_model(Block())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["collective", "nvlink"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_gpu_bf16(rank_pool, family, backend):
    rank_pool(2, backend="nccl").run(rank_family, family, True, None, None, torch.bfloat16, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_family_gpu_bf16_all_to_all(rank_pool, family):
    rank_pool(2, backend="nccl").run(rank_family, family, False, None, None, torch.bfloat16)


def _local(t):
    t = t.to_local() if hasattr(t, "to_local") else t  # both runs shard alike: compare this rank's shard
    return t.detach().clone()


def rank_transformers_ep(rank, world, path):
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig
    from transformers.utils import logging as hf_logging

    from deep_ep.integrations.hf_ep import register_ep_implementation

    hf_logging.disable_progress_bar()
    register_ep_implementation()
    ids = _batch(rank)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    want_loss = ref(ids, labels=ids).loss
    results = {}
    for impl in ("all_to_all", "deep_ep"):
        cfg = DistributedConfig(fsdp_size=world, ep_size=world, ep_implementation=impl)
        model = AutoModelForCausalLM.from_pretrained(path, distributed_config=cfg, dtype=torch.float32)
        loss = model(ids, labels=ids).loss
        _close(loss, want_loss, f"{impl} loss", 1e-5, 1e-5)
        loss.backward()
        results[impl] = {n: _local(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    assert results["deep_ep"].keys() == results["all_to_all"].keys() and results["deep_ep"]
    for name, g in results["deep_ep"].items():
        _close(g, results["all_to_all"][name], f"grad of {name}", 1e-5, 1e-5)


def test_transformers_ep_registry(rank_pool, tmp_path):
    """ep_implementation='deep_ep' in transformers' own expert parallelism equals its 'all_to_all'."""
    pytest.importorskip("transformers.distributed.expert_parallel")
    pytest.importorskip("accelerate")
    _model("qwen3_moe", experts=4).save_pretrained(tmp_path)
    rank_pool(2).run(rank_transformers_ep, str(tmp_path))


def rank_family_compressed(rank, world):
    """compression_level=8: the tokens reach the experts as fp8 (the logits move by about the codec's
    error, not more), and the Buffer the model uses compresses."""
    ref = _model("mixtral", None, torch.float32)
    model = copy.deepcopy(ref)
    patch_moe_model(model, compression_level=8, backend="collective")
    assert model.deep_ep_info.buffer.compression_level == 8
    ids = _batch(rank)
    want, got = ref(ids).logits, model(ids).logits
    err = float(((got - want).abs().max() / want.abs().max()).detach())
    assert 0 < err <= 0.08, f"fp8-wire logits: max error {err:.3g} of the scale"
    model(ids, labels=ids).loss.backward()  # gradients flow (16-bit)


def test_patch_with_compression(rank_pool):
    rank_pool(2).run(rank_family_compressed)
