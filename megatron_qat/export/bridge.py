"""Megatron-Bridge adapter: MXFP4 through ``AutoBridge.export_hf_weights_quant`` (megatron-bridge >= 0.6.2).

Bridge's quantized export (PR #2737; ``models/conversion/param_mapping.py``, read at main 067f987d)
calls ``q, scale = quant_fn(local_2d_shard, quant_block_size)`` on each rank's local TP / expert-TP
shard when ``quantization_checker(megatron_param_name)`` is True, then gathers ``q`` and ``scale``
with its own collectives: column mappings ``cat(dim=0)``, row mappings ``cat(dim=1)``,
``GatedMLPMapping`` ``chunk(2, dim=0)`` of every shard into gate/up before concatenating, and for
experts an ``all_gather`` over the EP group (``gather_from_ep_ranks``; scales through
``gather_from_ep_ranks_scale``, which ends in ``.squeeze().unsqueeze(-1)``). It yields
``(hf_name, q)`` and ``(hf_name + "_scale_inv", scale)``.

MXFP4 codes ``[out, in/2]`` and E8M0 scales ``[out, in/32]`` are row-aligned with the weight and
split along ``in`` exactly like it, so those concatenations give the bytes of quantizing the full
weight, provided every row-parallel shard holds whole 32-element blocks (:func:`mxfp4_quant_fn`
refuses otherwise). Use::

    pairs = bridge.export_hf_weights_quant(model, quantization_checker=mxfp4_quantization_checker,
                                           quant_fn=mxfp4_quant_fn, quant_block_size=QUANT_BLOCK_SIZE)
    for name, tensor in bridge_to_compressed_tensors(pairs): ...   # engine names and shapes

Where it cannot serve (docs/export.md), checked against megatron-bridge 0.6.2 in
tests/test_export_bridge.py:

- fused gpt-oss experts: Bridge's ``GPTOSSMLPGateUpProjMapping`` / ``GPTOSSMLPDownProjMapping`` are
  ``AutoMapping`` subclasses whose layout work (un-interleave, transpose, stacking experts) lives in
  ``megatron_to_hf`` only; their quant path is ``AutoMapping.megatron_to_hf_quant`` -> the plain
  column / row mapping, so each expert's codes arrive in Megatron's ``[gate; up]`` row order,
  untransposed, under the one fused name ``...experts.gate_up_proj`` (and ``_scale_inv``).
  :func:`bridge_to_compressed_tensors` REFUSES any quantized tensor without a per-expert ``.weight``
  name; use :func:`megatron_qat.export.export_mxfp4` with ``"gpt-oss"`` for those experts;
- the extra trailing dim that ``gather_from_ep_ranks_scale`` (``.squeeze().unsqueeze(-1)``, no EP=1
  fast path) puts on every expert scale (``[out, in/32, 1]``), which
  :func:`bridge_to_compressed_tensors` removes after checking the shape.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from .. import layouts
from .codec import ExportError, check_in_features, raise_if_nonfinite
from .formats import CT_PACKED, CT_SCALE

QUANT_BLOCK_SIZE = (1, 32)  # Bridge's (rows, cols) block: one E8M0 scale per row per 32 columns
BRIDGE_SCALE_SUFFIX = "_scale_inv"


def mxfp4_quantization_checker(megatron_param_name: str) -> bool:
    """True for routed-expert TEGroupedLinear / SequentialMLP weights (``...mlp.experts.linear_fc1.weight3``),
    False for everything else (attention, router, shared experts, dense MLPs, embeddings, norms)."""
    try:
        info = layouts.classify(str(megatron_param_name), (1, 1), None)  # name-only check: 2-D stand-in shape
    except layouts.LayoutError:
        return False
    return info is not None and info.family == "megatron"


def mxfp4_quant_fn(weight: torch.Tensor, quant_block_size=QUANT_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Bridge ``quant_fn``: one local 2-D shard ``[out, in_shard]`` -> (codes uint8 ``[out, in_shard/2]``,
    scales uint8 ``[out, in_shard/32]``) with the training numerics (:func:`megatron_qat.mxfp4.quantize`).

    Refuses (ExportError): a block size other than ``(1, 32)``, a non-2-D weight, ``in_shard % 32 != 0``
    (a row-parallel shard that splits a block would make Bridge's ``cat(dim=1)`` wrong), non-finite values."""
    from .. import mxfp4

    if quant_block_size is not None and tuple(quant_block_size) != QUANT_BLOCK_SIZE:
        raise ExportError(f"mxfp4_quant_fn: quant_block_size must be {QUANT_BLOCK_SIZE} (MXFP4: 1 row x 32 in_features), got {quant_block_size}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ExportError(f"mxfp4_quant_fn: expected a 2-D weight shard [out, in], got {getattr(weight, 'shape', type(weight))}")
    name = f"Bridge weight shard {list(weight.shape)}"
    check_in_features(name, weight.shape[1], QUANT_BLOCK_SIZE[1], shard=True)
    raise_if_nonfinite(weight, name)
    return mxfp4.quantize(weight.detach(), QUANT_BLOCK_SIZE[1])


def bridge_to_compressed_tensors(pairs: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename Bridge's ``X.weight`` (uint8 codes) / ``X.weight_scale_inv`` pairs to compressed-tensors
    ``X.weight_packed`` / ``X.weight_scale``; other tensors pass through unchanged.

    The scale of each pair must be ``[out, in/32]`` or Bridge's expert form ``[out, in/32, 1]``
    (the trailing dim is dropped); ``in`` is read off the codes (``2 * codes.shape[1]``). A code
    tensor without its scale (or the reverse) at the end of the stream, a non-uint8 scale, any
    other shape, and a uint8 or ``*_scale_inv`` tensor whose name is not ``X.weight[_scale_inv]``
    (Bridge's fused-expert stream, see the module docstring) are refused (ExportError)."""
    pending: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, t in pairs:
        name = str(name)
        if name.endswith(".weight" + BRIDGE_SCALE_SUFFIX):
            base = name[: -len(BRIDGE_SCALE_SUFFIX)]
            if t.dtype != torch.uint8:
                raise ExportError(f"{name}: expected uint8 E8M0 scales from mxfp4_quant_fn, got {t.dtype}")
            if base in pending:
                yield from _pair(base, pending.pop(base), t)
            else:
                scales[base] = t
        elif name.endswith(".weight") and t.dtype == torch.uint8:
            if name in scales:
                yield from _pair(name, t, scales.pop(name))
            else:
                pending[name] = t
        elif name.endswith(BRIDGE_SCALE_SUFFIX) or t.dtype == torch.uint8:
            raise ExportError(
                f"{name}: quantized tensor without a per-expert '.weight' name (Bridge's fused experts, e.g. its "
                "gpt-oss mappings, quantize through the plain column/row path: Megatron row order, every expert "
                'under this one name); use megatron_qat.export.export_mxfp4(model, "gpt-oss") for these experts'
            )
        else:
            yield name, t
    left = sorted(pending) + sorted(n + BRIDGE_SCALE_SUFFIX for n in scales)
    if left:
        raise ExportError(f"{left[0]}: MXFP4 codes and scales must come in pairs; its partner never arrived ({len(left)} unpaired)")


def _pair(weight_name: str, codes: torch.Tensor, scale: torch.Tensor):
    if codes.dim() != 2:
        raise ExportError(f"{weight_name}: MXFP4 codes must be 2-D [out, in/2], got {list(codes.shape)}")
    out, half = codes.shape
    want = (out, (2 * half) // QUANT_BLOCK_SIZE[1])
    if tuple(scale.shape) == want + (1,):
        scale = scale.squeeze(-1)  # gather_from_ep_ranks_scale's .squeeze().unsqueeze(-1)
    if tuple(scale.shape) != want:
        raise ExportError(f"{weight_name}{BRIDGE_SCALE_SUFFIX}: scale shape {list(scale.shape)} does not match codes {list(codes.shape)} (want {list(want)})")
    module = weight_name[: -len(".weight")]
    yield f"{module}.{CT_PACKED}", codes.contiguous()
    yield f"{module}.{CT_SCALE}", scale.contiguous()
