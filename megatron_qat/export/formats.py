"""Engine formats of one layer's MXFP4 expert bytes: names and layouts (export-specific naming).

Input: one layer, every expert, in Megatron's layout (:class:`LayerBytes`), as
:class:`~megatron_qat.mxfp4.payload.MXPayload`: ``fc1`` encodes ``[E, R1, H]`` with ``R1 = 2I``
rows ``[gate; up]`` (CONCAT) for a gated MLP, ``fc2`` ``[E, H, I]``; optional BF16 biases
``fc1_bias [E, R1]``, ``fc2_bias [E, H]``. Codes: element 2i in the low nibble; scales: E8M0 bytes,
one per ``block_size`` elements of in_features (docs/numerics.md).

Formats (:data:`FORMATS`); checkpoint names come from :func:`megatron_qat.layouts.hf_expert_names`,
this module only adds the MXFP4 storage suffixes:

- ``gpt-oss`` (family ``gpt_oss``; transformers ``integrations/mxfp4.py``, vLLM/SGLang
  ``Mxfp4MoEMethod``): ``<gate_up>_blocks [E, 2I, H/32, 16]`` and ``<gate_up>_scales [E, 2I, H/32]``
  with gate/up rows INTERLEAVED (even = gate, odd = up), ``<down>_blocks [E, H, I/32, 16]`` /
  ``<down>_scales [E, H, I/32]``; biases ``<gate_up>_bias [E, 2I]`` (interleaved) and
  ``<down>_bias [E, H]``. Needs a gated MLP.

The two engine formats hold E2M1 codes in OCP MX blocks of :data:`ENGINE_BLOCK_SIZE` elements (gpt-oss
``*_blocks`` rows of 16 bytes, compressed-tensors ``group_size``), whatever E2M1 rule made them;
``raw`` ships any block size and rule.
- ``compressed-tensors`` (``mxfp4-pack-quantized``, compressed-tensors 0.20
  ``MXFP4PackedCompressor``; families with per-expert ``nn.Linear`` names: qwen3_moe, qwen2_moe,
  deepseek_v3, deepseek_v2, mixtral): per expert ``<proj>.weight_packed [out, in/2]`` and
  ``<proj>.weight_scale [out, in/32]``, ``<proj>.bias`` for biases.
- ``raw``: Megatron names (:func:`hf_expert_names` ``"megatron"``, global expert ids) with
  ``.mxfp4_codes`` / ``.mxfp4_scales`` appended (and ``linear_fcN.biasE``): the bytes as
  gathered, no re-layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .. import layouts
from ..mxfp4.payload import MXPayload
from ..numerics.constants import DEFAULT_BLOCK_SIZE
from ..numerics.rules import Element, Rule
from .codec import ExportError

FORMATS = ("gpt-oss", "compressed-tensors", "raw")
ENGINE_FORMATS = ("gpt-oss", "compressed-tensors")
ENGINE_BLOCK_SIZE = DEFAULT_BLOCK_SIZE  # what gpt-oss / compressed-tensors MXFP4 loaders read (OCP MX)
PER_EXPERT_FAMILIES = ("qwen3_moe", "qwen2_moe", "deepseek_v3", "deepseek_v2", "mixtral")

# MXFP4 storage suffixes (export-specific; the weight names themselves come from layouts.py).
GPT_OSS_BLOCKS, GPT_OSS_SCALES, GPT_OSS_BIAS = "_blocks", "_scales", "_bias"
CT_PACKED, CT_SCALE = "weight_packed", "weight_scale"
RAW_CODES, RAW_SCALES = ".mxfp4_codes", ".mxfp4_scales"


@dataclass
class LayerBytes:
    """One layer's experts, full (after the gathers), Megatron layout; see the module docstring."""

    layer: int  # global, 0-based (Megatron TransformerLayer.layer_number - 1)
    glu: bool
    fc1: MXPayload  # [E, R1, H]
    fc2: MXPayload  # [E, H, I]
    fc1_bias: torch.Tensor | None = None
    fc2_bias: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.fc1.codes.shape[0]


def check_numerics(fmt: str, block_size: int, rule: Rule) -> None:
    """The engine formats hold E2M1 codes in blocks of :data:`ENGINE_BLOCK_SIZE`; ExportError otherwise."""
    if fmt in ENGINE_FORMATS and rule.element is not Element.E2M1:
        raise ExportError(f"format {fmt} stores MXFP4 (E2M1) codes; rule {rule.name} makes {rule.element.name} ones")
    if fmt in ENGINE_FORMATS and block_size != ENGINE_BLOCK_SIZE:
        raise ExportError(
            f"format {fmt} stores MXFP4 blocks of {ENGINE_BLOCK_SIZE} elements (what its loaders read); block size "
            f"{block_size} (OPEN_TRAINING_MXFP4_BLOCK_SIZE) is an ablation no engine loads: export it as format raw"
        )


def check_format(fmt: str, family: str | None) -> str:
    """The family the format names tensors with; ExportError for a bad combination."""
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r}: accepted formats are {', '.join(FORMATS)}")
    if fmt == "gpt-oss":
        if family not in (None, "gpt_oss"):
            raise ExportError(f"format gpt-oss names tensors as family gpt_oss, got family {family!r}")
        return "gpt_oss"
    if fmt == "compressed-tensors":
        if family not in PER_EXPERT_FAMILIES:
            raise ExportError(
                f"format compressed-tensors needs the checkpoint family whose per-expert names to use "
                f"(family={family!r}; accepted: {', '.join(PER_EXPERT_FAMILIES)})"
            )
        return family
    return "megatron"


def interleave_rows(concat: torch.Tensor) -> torch.Tensor:
    """``[E, 2I, ...]`` with rows ``[gate; up]`` -> rows interleaved ``gate0, up0, gate1, ...``."""
    gate, up = concat.chunk(2, dim=1)
    return torch.stack((gate, up), dim=2).reshape(concat.shape)


def emit_layer(data: LayerBytes, fmt: str, family: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The engine-ready ``(name, tensor)`` pairs of one layer, in a fixed order."""
    family = check_format(fmt, family)
    check_numerics(fmt, data.fc1.block_size, data.fc1.rule)
    if fmt == "gpt-oss":
        yield from _gpt_oss(data)
    elif fmt == "compressed-tensors":
        yield from _compressed_tensors(data, family)
    else:
        yield from _raw(data)


def _gpt_oss(d: LayerBytes):
    if not d.glu:
        raise ExportError(f"layer {d.layer}: gpt-oss format needs a gated MLP (gated_linear_unit=True)")
    names = layouts.hf_expert_names("gpt_oss", d.layer)
    gu, down = names["gate_up"], names["down"]
    fc1 = d.fc1.map(interleave_rows)
    yield gu + GPT_OSS_BLOCKS, fc1.blocks().contiguous()
    yield gu + GPT_OSS_SCALES, fc1.scales.contiguous()
    if d.fc1_bias is not None:
        yield gu + GPT_OSS_BIAS, interleave_rows(d.fc1_bias.unsqueeze(-1)).squeeze(-1).contiguous()
    yield down + GPT_OSS_BLOCKS, d.fc2.blocks().contiguous()
    yield down + GPT_OSS_SCALES, d.fc2.scales.contiguous()
    if d.fc2_bias is not None:
        yield down + GPT_OSS_BIAS, d.fc2_bias.contiguous()


def _module_name(weight_name: str) -> str:
    if not weight_name.endswith(".weight"):
        raise AssertionError(f"layouts.hf_expert_names gave {weight_name!r}, expected a '.weight' name")
    return weight_name[: -len(".weight")]


def _compressed_tensors(d: LayerBytes, family: str):
    names = layouts.hf_expert_names(family, d.layer)
    if not d.glu:
        raise ExportError(f"layer {d.layer}: family {family} has gate_proj/up_proj experts; the model has no gated MLP")
    half = d.fc1.codes.shape[1] // 2
    for e in range(d.num_experts):
        parts = [("gate", d.fc1[e, :half]), ("up", d.fc1[e, half:]), ("down", d.fc2[e])]
        biases = {}
        if d.fc1_bias is not None:
            biases["gate"], biases["up"] = d.fc1_bias[e].chunk(2, dim=0)
        if d.fc2_bias is not None:
            biases["down"] = d.fc2_bias[e]
        for role, payload in parts:
            module = _module_name(names[role].format(E=e))
            yield f"{module}.{CT_PACKED}", payload.codes.contiguous()
            yield f"{module}.{CT_SCALE}", payload.scales.contiguous()
            if role in biases:
                yield f"{module}.bias", biases[role].contiguous()


def _raw(d: LayerBytes):
    names = layouts.hf_expert_names("megatron", d.layer)
    for role, payload, bias in (("fc1", d.fc1, d.fc1_bias), ("fc2", d.fc2, d.fc2_bias)):
        for e in range(d.num_experts):
            name = names[role].format(E=e)
            yield name + RAW_CODES, payload.codes[e].contiguous()
            yield name + RAW_SCALES, payload.scales[e].contiguous()
            if bias is not None:
                yield name.replace(".weight", ".bias"), bias[e].contiguous()
