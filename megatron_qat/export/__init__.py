"""MXFP4 export: ship exactly the bits the fake-QAT forward trained against (docs/export.md).

- :func:`export_mxfp4` -- stream a live Megatron model's routed-expert weights as MXFP4 bytes,
  quantize-then-gather over expert-TP and EP, one layer at a time (RL weight sync).
- :func:`convert_checkpoint` -- offline BF16 HF checkpoint -> gpt-oss MXFP4 or compressed-tensors
  ``mxfp4-pack-quantized`` (``megatron-qat export``).
- :func:`verify_export` -- the shipped bytes decode to exactly ``fake_quantize(source)``.
- :mod:`megatron_qat.export.bridge` -- ``quant_fn`` / ``quantization_checker`` for Megatron-Bridge's
  ``AutoBridge.export_hf_weights_quant`` and the renaming to the engine format.
"""

from __future__ import annotations

from .codec import ExportError, quantize_experts
from .formats import FORMATS, LayerBytes, emit_layer
from .gather import ExpertGroups, grid_root, groups_from_parallel_state
from .live import export_mxfp4, find_expert_modules
from .offline import convert_checkpoint
from .verify import VerifyResult, verify_export

__all__ = [
    "ExportError",
    "VerifyResult",
    "convert_checkpoint",
    "verify_export",
    "ExpertGroups",
    "FORMATS",
    "LayerBytes",
    "emit_layer",
    "export_mxfp4",
    "find_expert_modules",
    "grid_root",
    "groups_from_parallel_state",
    "quantize_experts",
]
