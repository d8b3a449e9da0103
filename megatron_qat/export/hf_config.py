"""The ``config.json`` entries an MXFP4 export writes: the loaders' ``quantization_config`` and our
provenance record.

- gpt-oss (transformers ``Mxfp4Config`` / vLLM / SGLang ``quant_method: mxfp4``):
  ``{"quant_method": "mxfp4", "modules_to_not_convert": [...]}``; transformers converts only
  ``GptOssMLP.experts`` not listed there, so attention, router, embeddings and lm_head stay BF16
  (the list openai/gpt-oss-* ship).
- compressed-tensors 0.20 (``QuantizationConfig``): one config group, ``targets: ["Linear"]``,
  weights as the ``MXFP4A16`` preset (4-bit float, group strategy, group_size 32, symmetric,
  static, uint8 E8M0 scales), format ``mxfp4-pack-quantized``, status ``compressed``; every
  non-expert ``nn.Linear`` (any 2-D ``*.weight`` that is not a routed expert) is in ``ignore``,
  as llm-compressor writes it.
- ``megatron_qat``: version, recipe, rule (its name and the upstream it mimics), block size, format,
  source family.
"""

from __future__ import annotations

from ..numerics.rules import Rule

GPT_OSS_MODULES_TO_NOT_CONVERT = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
CT_FORMAT = "mxfp4-pack-quantized"


def gpt_oss_quantization_config() -> dict:
    return {"quant_method": "mxfp4", "modules_to_not_convert": list(GPT_OSS_MODULES_TO_NOT_CONVERT)}


def compressed_tensors_quantization_config(ignore: list[str], block_size: int) -> dict:
    weights = {
        "num_bits": 4, "type": "float", "symmetric": True, "group_size": block_size, "strategy": "group",
        "dynamic": False, "scale_dtype": "torch.uint8", "zp_dtype": "torch.uint8",
    }
    return {
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                        "output_activations": None, "format": CT_FORMAT},
        },
        "quant_method": "compressed-tensors",
        "format": CT_FORMAT,
        "quantization_status": "compressed",
        "kv_cache_scheme": None,
        "ignore": sorted(ignore),
    }


def provenance(fmt: str, family: str, block_size: int, rule: Rule, recipe: str) -> dict:
    """What made the bytes: the rule by name (:data:`megatron_qat.numerics.rules.RULES`; what
    ``megatron-qat parity DST --source SRC`` checks them under) and the upstream it mimics, the
    recipe it is the weight rule of, the block size."""
    from .. import __version__

    return {
        "exporter": "megatron-qat export",
        "version": __version__,
        "format": fmt,
        "source_family": family,
        "recipe": recipe,
        "rule": rule.name,
        "numerics": rule.mimics,
        "block_size": block_size,
    }
