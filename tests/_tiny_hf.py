"""Tiny random MoE checkpoints written by the real transformers classes (``save_pretrained``, CPU).

Each model has one decoder layer, 4 experts, hidden 64 and a 32- or 96-wide expert MLP, so every
expert tensor has in_features % 32 == 0 and a save takes well under a second. ``build(family, dir)``
returns the model (bf16) after saving it; what lands on disk is what transformers 5.x writes
(per-expert tensors for Qwen/DeepSeek/Mixtral, fused ``[E, in, out]`` for gpt-oss and Llama-4).
"""

from __future__ import annotations

import torch

HIDDEN = 64
_ATTN = dict(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=64)
_MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1)


def _spec(family: str):
    import transformers as T

    return {
        "gpt_oss": (T.GptOssConfig, T.GptOssForCausalLM, dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"])),
        "llama4": (T.Llama4TextConfig, T.Llama4ForCausalLM, dict(intermediate_size=32, intermediate_size_mlp=64, num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1, moe_layers=[0])),
        "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, dict(intermediate_size=96, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[])),
        "qwen2_moe": (T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM, dict(intermediate_size=96, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)),
        "mixtral": (T.MixtralConfig, T.MixtralForCausalLM, dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2)),
        "deepseek_v3": (T.DeepseekV3Config, T.DeepseekV3ForCausalLM, dict(intermediate_size=96, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=0, n_shared_experts=1, **_MLA)),
        "deepseek_v2": (T.DeepseekV2Config, T.DeepseekV2ForCausalLM, dict(intermediate_size=96, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=0, n_shared_experts=1, **_MLA)),
    }[family]


FAMILIES = ("gpt_oss", "llama4", "qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "deepseek_v2")


def build(family: str, directory, seed: int = 0):
    """Save a tiny random ``family`` model to ``directory`` with ``save_pretrained``; return the model."""
    config_cls, model_cls, extra = _spec(family)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**_ATTN, **extra)).to(torch.bfloat16).eval()
    with torch.no_grad():  # random experts at a realistic scale (init may leave some at zero)
        for name, p in model.named_parameters():
            if "experts" in name:
                p.normal_(0.0, 0.02)
    model.save_pretrained(str(directory))
    return model


def write_per_expert(directory, *, experts: int = 2, hidden: int = HIDDEN, inter: int = 32, layers: int = 1, seed: int = 0):
    """Without transformers: a Qwen3-MoE-named BF16 checkpoint (``config.json`` + ``model.safetensors``)
    holding only per-expert ``[out, in]`` weights and one router per layer; returns its tensors."""
    import json
    import os

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        p = f"model.layers.{layer}.mlp"
        for e in range(experts):
            for proj, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
                tensors[f"{p}.experts.{e}.{proj}_proj.weight"] = (torch.randn(*shape, generator=g) * 0.02).bfloat16()
        tensors[f"{p}.gate.weight"] = torch.randn(experts, hidden, generator=g).bfloat16()
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]}, f)
    return tensors
