"""Random-weight configs of every supported MoE family, for tests, examples and benchmarks (no downloads).

``moe_config('qwen3_moe', hidden=2048, experts=64, layers=4)`` returns a
transformers config; ``AutoModelForCausalLM.from_config(cfg)`` builds the
model. Sizes default to a tiny model (hidden 32, 2 layers, 4 experts).
"""

from __future__ import annotations

from typing import Any, Dict

__all__ = ["FAMILIES", "moe_config"]

#: model_type of each supported family (the key ``moe_config`` takes) -> family name.
FAMILIES: Dict[str, str] = {
    "mixtral": "Mixtral",
    "qwen2_moe": "Qwen2-MoE",
    "qwen3_moe": "Qwen3-MoE",
    "deepseek_v3": "DeepSeek-V3",
    "olmoe": "OLMoE",
    "gpt_oss": "GPT-OSS",
}


def moe_config(
    family: str,
    *,
    hidden: int = 32,
    layers: int = 2,
    experts: int = 4,
    topk: int = 2,
    intermediate: int = 16,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 128,
    max_positions: int = 128,
    **overrides: Any,
):
    """A transformers config of ``family`` (a key of :data:`FAMILIES`, or ``'llama4'``) with the given sizes.

    ``intermediate`` is the per-expert intermediate size; shared experts and
    dense layers get 1.5x of it. Token ids 0/1/2 are pad/eos/bos. Extra
    keyword arguments override config fields. Needs transformers.
    """
    from transformers import AutoConfig

    head_dim = hidden // heads
    common: Dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    dense = intermediate * 3 // 2
    if family == "mixtral":
        kw = dict(intermediate_size=intermediate, num_local_experts=experts, num_experts_per_tok=topk)
    elif family == "qwen2_moe":
        kw = dict(
            intermediate_size=dense,
            moe_intermediate_size=intermediate,
            shared_expert_intermediate_size=dense,
            num_experts=experts,
            num_experts_per_tok=topk,
            norm_topk_prob=False,
        )
    elif family == "qwen3_moe":
        kw = dict(
            intermediate_size=dense,
            moe_intermediate_size=intermediate,
            num_experts=experts,
            num_experts_per_tok=topk,
            norm_topk_prob=True,
            head_dim=head_dim,
        )
    elif family == "deepseek_v3":
        groups = 2 if experts % 2 == 0 and experts >= 4 else 1
        kw = dict(
            intermediate_size=dense,
            moe_intermediate_size=intermediate,
            n_routed_experts=experts,
            num_experts_per_tok=topk,
            n_group=groups,
            topk_group=1 if groups > 1 else 1,
            n_shared_experts=1,
            first_k_dense_replace=1 if layers > 1 else 0,
            kv_lora_rank=max(8, hidden // 2),
            q_lora_rank=max(8, hidden * 3 // 4),
            qk_rope_head_dim=max(4, head_dim // 2),
            qk_nope_head_dim=max(4, head_dim // 2),
            v_head_dim=head_dim,
            num_key_value_heads=heads,
            routed_scaling_factor=2.5,
        )
    elif family == "olmoe":
        kw = dict(intermediate_size=intermediate, num_experts=experts, num_experts_per_tok=topk)
    elif family == "gpt_oss":
        kw = dict(
            intermediate_size=intermediate,
            num_local_experts=experts,
            num_experts_per_tok=topk,
            head_dim=head_dim,
            sliding_window=8,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    elif family == "llama4":
        kw = dict(
            intermediate_size=intermediate,
            intermediate_size_mlp=dense,
            num_local_experts=experts,
            num_experts_per_tok=1,
            head_dim=head_dim,
        )
        family = "llama4_text"
    else:
        raise ValueError(f"unknown MoE family {family!r}; one of {sorted(FAMILIES)} or 'llama4'")
    kw = {**common, **kw, **overrides}
    return AutoConfig.for_model(family, **kw)
