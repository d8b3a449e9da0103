"""The rollout side of benchmarks/bench_mismatch.py: an engine stand-in built OUTSIDE Megatron from
what would be shipped, on transformers' own ``Qwen3MoeForCausalLM``.

What it gets (nothing else): the BF16 non-expert weights of the Megatron model (a state dict) and,
per MoE layer, the expert weights as the engine holds them, ``fc1 [E, 2I, H]`` (rows ``[gate; up]``)
and ``fc2 [E, H, I]`` in BF16 -- the decoded shipped MXFP4 bytes, or BF16 re-quantized by the
engine's own rule, or plain BF16 (bench_mismatch.py decides). :func:`megatron_to_hf` converts the
names and layouts; every value is copied bit for bit (a BF16 tensor stays the same bits; a
non-BF16 source tensor, e.g. the fp32 norms of the CPU smoke's local spec, is rounded and counted
in ``Converted.rounded``).

Conversion (megatron-core 0.16-0.19 GPTModel, TE or local layer spec, no biases):

- ``self_attention.linear_qkv.weight`` ``[ng * (np/ng + 2) * hn, H]``: per query group ``g`` the
  rows of its ``np/ng`` query heads, then its key head, then its value head (megatron
  ``SelfAttention.get_query_key_value_tensors``) -> ``q_proj`` (head ``g*np/ng + j``), ``k_proj``,
  ``v_proj`` (head ``g``), which is transformers' GQA grouping (``repeat_kv``: query head ``i`` uses
  key head ``i // (np/ng)``);
- the input norm (``linear_qkv.layer_norm_weight`` of TE's fused norm+linear, or
  ``input_layernorm.weight``) -> ``input_layernorm``; ``q_layernorm``/``k_layernorm`` -> ``q_norm``/
  ``k_norm`` (per head, both sides normalise before RoPE); ``pre_mlp_layernorm`` ->
  ``post_attention_layernorm``; ``mlp.router.weight`` -> ``mlp.gate.weight``;
- RoPE: megatron's non-interleaved rotary (``cat(freqs, freqs)``, rotate-half) with base
  ``rotary_base`` is transformers' default RoPE with ``rope_theta`` = that base;
- router: megatron's default (top-k of the logits, softmax over the k selected) equals
  transformers' softmax over all experts, top-k, renormalised (``norm_topk_prob=True``);
- experts: megatron's GLU takes ``chunk(2)`` of fc1's output as ``(gate, up)``, transformers'
  ``gate_up_proj`` is concatenated ``[gate; up]`` too; the router weight multiplies the expert
  output after fc2 in both (megatron folds it into the SwiGLU output, see below).

Expert GEMMs run in :func:`engine_experts_forward`, registered with transformers'
``ExpertsInterface`` as ``"mqat_engine"`` (transformers' extension point for expert kernels): the
eager per-expert loop of ``Qwen3MoeExperts.forward``, plus the engine's activation quantization when
the experts module carries a rule (``engine_activation_rule``): QDQ of fc1's input and of fc2's
input, the SwiGLU output BEFORE the router weight, as FlashInfer's trtllm-gen / CUTLASS MoE
quantize it (shared/notes/engine-activation-quant.md: the FC1 epilogue re-quantizes the SwiGLU
output; the router weights are applied at finalize). Megatron's TEGroupedMLP instead feeds fc2
``SwiGLU(x) * prob`` (``bias_act_func``), so a trainer-side activation QDQ on fc2's input sees
prob-scaled values -- one source of mismatch variant (f) measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMPLEMENTATION = "transformers Qwen3MoeForCausalLM (converted checkpoint), experts via ExpertsInterface 'mqat_engine'"
EXPERTS_KEY = "mqat_engine"


@dataclass(frozen=True)
class Sizes:
    """The model's shape (shared by the Megatron build and the conversion)."""

    layers: int
    hidden: int
    heads: int
    kv_groups: int
    experts: int
    topk: int
    moe_ffn: int
    vocab: int
    max_seq: int
    rotary_base: float
    norm_eps: float

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass
class Converted:
    state: dict  # transformers state dict (BF16)
    rounded: list  # megatron names whose dtype was not BF16 (rounded by the conversion)


def hf_config(sizes: Sizes):
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        vocab_size=sizes.vocab, hidden_size=sizes.hidden, intermediate_size=sizes.moe_ffn,
        num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads, num_key_value_heads=sizes.kv_groups,
        head_dim=sizes.head_dim, hidden_act="silu", max_position_embeddings=sizes.max_seq, rms_norm_eps=sizes.norm_eps,
        use_cache=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(sizes.rotary_base)},
        attention_bias=False, use_sliding_window=False, sliding_window=None, attention_dropout=0.0,
        decoder_sparse_step=1, moe_intermediate_size=sizes.moe_ffn, num_experts_per_tok=sizes.topk,
        num_experts=sizes.experts, norm_topk_prob=True, mlp_only_layers=[],
    )
    cfg._experts_implementation = EXPERTS_KEY
    return cfg


def megatron_to_hf(state: dict, experts: dict, sizes: Sizes) -> Converted:
    """``state``: the Megatron model's state dict (expert ``weightN`` entries and ``_extra_state``
    are ignored); ``experts[layer] = (fc1 [E, 2I, H], fc2 [E, H, I])`` as the engine holds them.
    Raises ValueError naming any Megatron tensor the conversion did not consume or any missing one."""
    src = {k: v for k, v in state.items() if "_extra_state" not in k and ".mlp.experts." not in k}
    used, out, rounded = set(), {}, []

    def take(name):
        if name not in src:
            raise ValueError(f"Megatron state dict has no {name}")
        used.add(name)
        t = src[name].detach()
        if t.dtype != torch.bfloat16:
            rounded.append(name)
        return t.to(torch.bfloat16, copy=True).contiguous()

    def first(*names):
        for n in names:
            if n in src:
                return take(n)
        raise ValueError(f"Megatron state dict has none of {names}")

    per_group, hn, ng, h = sizes.heads // sizes.kv_groups, sizes.head_dim, sizes.kv_groups, sizes.hidden
    out["model.embed_tokens.weight"] = take("embedding.word_embeddings.weight")
    for layer in range(sizes.layers):
        m, t = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        qkv = take(m + "self_attention.linear_qkv.weight").view(ng, per_group + 2, hn, h)
        out[t + "self_attn.q_proj.weight"] = qkv[:, :per_group].reshape(sizes.heads * hn, h).contiguous()
        out[t + "self_attn.k_proj.weight"] = qkv[:, per_group].reshape(ng * hn, h).contiguous()
        out[t + "self_attn.v_proj.weight"] = qkv[:, per_group + 1].reshape(ng * hn, h).contiguous()
        out[t + "input_layernorm.weight"] = first(m + "self_attention.linear_qkv.layer_norm_weight",
                                                  m + "input_layernorm.weight")
        out[t + "self_attn.q_norm.weight"] = take(m + "self_attention.q_layernorm.weight")
        out[t + "self_attn.k_norm.weight"] = take(m + "self_attention.k_layernorm.weight")
        out[t + "self_attn.o_proj.weight"] = take(m + "self_attention.linear_proj.weight")
        out[t + "post_attention_layernorm.weight"] = take(m + "pre_mlp_layernorm.weight")
        out[t + "mlp.gate.weight"] = take(m + "mlp.router.weight")
        fc1, fc2 = experts[layer]
        want1, want2 = (sizes.experts, 2 * sizes.moe_ffn, h), (sizes.experts, h, sizes.moe_ffn)
        if tuple(fc1.shape) != want1 or tuple(fc2.shape) != want2 or fc1.dtype != torch.bfloat16 or fc2.dtype != torch.bfloat16:
            raise ValueError(f"layer {layer} experts: got fc1 {fc1.dtype} {list(fc1.shape)}, fc2 {fc2.dtype} "
                             f"{list(fc2.shape)}; expected bfloat16 {list(want1)} and {list(want2)}")
        out[t + "mlp.experts.gate_up_proj"] = fc1.contiguous()
        out[t + "mlp.experts.down_proj"] = fc2.contiguous()
    out["model.norm.weight"] = take("decoder.final_layernorm.weight")
    out["lm_head.weight"] = take("output_layer.weight")
    left = sorted(set(src) - used)
    if left:
        raise ValueError(f"conversion does not know Megatron tensor(s) {left[:4]} (unsupported layer spec or option)")
    return Converted(out, rounded)


def engine_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """``Qwen3MoeExperts`` forward as the engine's MoE kernel computes it (registered as
    ``"mqat_engine"``): per expert ``down(SwiGLU(gate_up(x)))`` times the router weight, summed.
    ``self.engine_activation_rule`` (a megatron_qat ``Rule`` or None) quantize-dequantizes fc1's
    input and fc2's input (blocks of 32 along K) with ``mxfp4.fake_quantize_activation``."""
    rule = getattr(self, "engine_activation_rule", None)
    if rule is not None:
        from megatron_qat import mxfp4

        def qdq(x):
            return mxfp4.fake_quantize_activation(x, rule, 32)
    else:
        def qdq(x):
            return x
    out = torch.zeros_like(hidden_states)
    hit = torch.unique(top_k_index).tolist()
    x_q = qdq(hidden_states)
    for e in hit:
        tok, pos = torch.where(top_k_index == e)
        gate, up = torch.nn.functional.linear(x_q[tok], self.gate_up_proj[e]).chunk(2, dim=-1)
        act = qdq(self.act_fn(gate) * up)
        y = torch.nn.functional.linear(act, self.down_proj[e]) * top_k_weights[tok, pos, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def register_engine_experts() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_KEY, engine_experts_forward)


def build(converted: Converted, sizes: Sizes, activation_rule, device) -> torch.nn.Module:
    """A ``Qwen3MoeForCausalLM`` in BF16 holding exactly ``converted.state`` (strict load)."""
    from transformers import Qwen3MoeForCausalLM

    register_engine_experts()
    with torch.device(device):
        model = Qwen3MoeForCausalLM(hf_config(sizes))
    # assign: the parameters become the BF16 tensors given; buffers (RoPE inv_freq) stay fp32 as
    # from_pretrained(dtype=bfloat16) leaves them
    model.load_state_dict({k: v.to(device) for k, v in converted.state.items()}, strict=True, assign=True)
    model.eval()
    wrong = [n for n, p in model.named_parameters() if p.dtype != torch.bfloat16]
    if wrong:
        raise ValueError(f"rollout parameters not in BF16 after loading: {wrong[:3]}")
    for layer in model.model.layers:
        layer.mlp.experts.engine_activation_rule = activation_rule
    return model


@torch.no_grad()
def sample(model, prompts: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``G = uniforms.shape[1]`` tokens after each prompt at temperature 1 with a KV cache, as an
    engine does, by inverse CDF on the fp32 softmax: token = first index whose cumulative probability
    exceeds ``u``. The same ``uniforms`` for every variant means identical draws wherever the rollout
    distributions agree. Returns ``tokens [P, Lp + G]`` and the rollout's log-probabilities of the
    sampled tokens ``[P, G]`` (fp32, from the logits the sampler used)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    tokens = prompts
    logits = model(input_ids=prompts, past_key_values=cache, use_cache=True).logits[:, -1]
    logps = []
    for step in range(uniforms.shape[1]):
        logp = torch.log_softmax(logits.float(), dim=-1)
        cdf = torch.cumsum(logp.exp(), dim=-1)
        u = uniforms[:, step : step + 1] * cdf[:, -1:]
        nxt = torch.searchsorted(cdf, u).clamp_(max=logp.shape[-1] - 1)
        logps.append(logp.gather(1, nxt))
        tokens = torch.cat([tokens, nxt], dim=1)
        if step + 1 < uniforms.shape[1]:
            logits = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1]
    return tokens, torch.cat(logps, dim=1)
