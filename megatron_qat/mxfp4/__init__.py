"""MX numerics of every engine rule (:mod:`megatron_qat.numerics.rules`; the default,
``FLASHINFER_MXFP4``, is bit-identical to FlashInfer ``fp4_quantize(sf_vec_size=32,
sf_use_ue8m0=True)``): the one op/dispatch layer over :mod:`megatron_qat.numerics` (reference) and
:mod:`megatron_qat.kernels` (Triton).

Public contract (docs/numerics.md states the rules). Every call takes ``rule=`` (a
:class:`~megatron_qat.numerics.rules.Rule`, default ``FLASHINFER_MXFP4``); E2M1 codes are packed two
per byte, E4M3 codes (``FLASHINFER_MXFP8``) are one byte per element:

- :func:`quantize` ``x [..., K] -> (codes uint8 [..., K//2], scales uint8 [..., K//block_size])``
- :func:`dequantize` ``(codes, scales) -> values``
- :func:`fake_quantize` quantize -> dequantize in ``x.dtype`` (non-finite blocks come out NaN)
- :func:`fake_quantize_ste` the same with a straight-through (identity) gradient
- :func:`fake_quantize_many` / :func:`quantize_many` the same over a list (one launch with the kernel)
- :class:`GroupedFakeQuantizer` ``fake_quantize_many`` of one module's weights, keeping the
  kernel's prepared launch with the module
- :func:`fake_quantize_activation` ``(x, rule, block_size)`` the per-micro-batch activation QDQ;
  :class:`ActivationFakeQuantizer` the same, keeping one module's compiled launches
  (straight-through backward, prepared launch on CUDA)

``impl`` picks the implementation: ``"reference"`` (vectorised PyTorch, any device) or
``"triton"`` (fused kernel, CUDA). ``None`` follows ``MEGATRON_QAT_KERNEL`` and otherwise uses the
kernel on CUDA tensors when it can run there, the reference elsewhere (:mod:`.dispatch`).

``quantize``, ``fake_quantize``, ``fake_quantize_many``, ``fake_quantize_ste`` and
``fake_quantize_activation`` are also ``torch.library`` custom ops (``torch.ops.megatron_qat.*``, :mod:`.ops`): under ``torch.compile``
these functions call the ops, so ``fullgraph=True`` traces them without graph breaks.
"""

from __future__ import annotations

import torch

from ..numerics.format import (
    DEFAULT_BLOCK_SIZE,
    E2M1_MAGNITUDES,
    E8M0_BIAS,
    SUPPORTED_DTYPES,
    e2m1_lut,
    e8m0_to_float32,
    pack_nibbles,
    unpack_nibbles,
)
from ..numerics.reference import check_rule, dequantize_reference
from ..numerics.rules import (
    FLASHINFER_MXFP4,
    FLASHINFER_MXFP8,
    RULES,
    TIES_DOWN_MXFP4,
    VLLM_ONLINE_MXFP4,
    Rule,
)
from . import backends, ops
from .dispatch import resolve_impl
from .grouped import GroupedFakeQuantizer
from .payload import MXPayload  # noqa: F401  (codes + scales + block size + rule: the exporters' and parity's unit)
from .ste import ActivationFakeQuantizer, fake_quantize_activation, fake_quantize_ste

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "E2M1_MAGNITUDES",
    "E8M0_BIAS",
    "SUPPORTED_DTYPES",
    "quantize",
    "dequantize",
    "fake_quantize",
    "fake_quantize_ste",
    "fake_quantize_activation",
    "fake_quantize_many",
    "quantize_many",
    "GroupedFakeQuantizer",
    "ActivationFakeQuantizer",
    "resolve_impl",
    "e2m1_lut",
    "e8m0_to_float32",
    "pack_nibbles",
    "unpack_nibbles",
    "Rule",
    "RULES",
    "FLASHINFER_MXFP4",
    "VLLM_ONLINE_MXFP4",
    "TIES_DOWN_MXFP4",
    "FLASHINFER_MXFP8",
]


def quantize(
    x: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, *, impl: str | None = None, rule: Rule = FLASHINFER_MXFP4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` exactly as ``rule``'s engine does (default: FlashInfer MXFP4).

    Args:
        x: float16, bfloat16 or float32, shape ``[..., K]`` with ``K % block_size == 0``, any device.
        block_size: elements per scale along the last dim (32 = FlashInfer; others are ablations).
    Returns:
        ``codes`` uint8 ``[..., K // 2]`` (E2M1: element 2i in the low nibble, 2i+1 in the high
        nibble, bit 3 of a nibble is the sign; E4M3 rules: ``[..., K]``, one byte each) and ``scales`` uint8 ``[..., K // block_size]`` (E8M0,
        bias 127): FlashInfer's ``fp4_quantize(x, None, 32, True, is_sf_swizzled_layout=False)``.
        An empty ``x`` (zero rows, or ``K = 0``) gives empty codes and scales of those shapes.
    Raises:
        ValueError: ``K % block_size != 0`` or non-finite input (the message says where; this check
        reads one bool back from the device).
    """
    check_rule(rule)
    if torch.compiler.is_compiling():
        return ops.quantize(x, block_size, impl, rule.name)
    return backends.quantize(x, block_size, impl, rule)


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    rule: Rule = FLASHINFER_MXFP4,
) -> torch.Tensor:
    """Decode: ``value = element(code) * 2 ** (scale - 127)``, computed exactly in float32 and
    rounded to ``dtype`` (IEEE: a value beyond the dtype's range becomes +-inf). E2M1 code 0x8 and
    E4M3 byte 0x80 give -0.0; scale byte 255 (E8M0 NaN) gives NaN. ``rule`` picks the element
    format and storage layout.
    """
    return dequantize_reference(codes, scales, dtype, block_size, rule=rule)


def fake_quantize(
    x: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, *, impl: str | None = None, rule: Rule = FLASHINFER_MXFP4
) -> torch.Tensor:
    """Quantize-dequantize ``x`` under ``rule`` in one call; same shape, dtype and device as ``x``.

    For finite input the result equals ``dequantize(*quantize(x, block_size), dtype=x.dtype,
    block_size=block_size, rule=rule)`` bit for bit. A block holding NaN or +-inf comes out all NaN:
    we differ from the engines (FlashInfer encodes NaN as +6) on purpose, so that a diverging weight stays visible.
    Never synchronises with the host and never copies from it (safe on the training hot path and
    inside a CUDA graph capture). The result does not require grad (see :func:`fake_quantize_ste`).
    """
    check_rule(rule)
    if torch.compiler.is_compiling():
        return ops.fake_quantize(x, block_size, impl, rule.name)
    return backends.fake_quantize(x, block_size, impl, rule)


def fake_quantize_many(
    xs, block_size: int = DEFAULT_BLOCK_SIZE, *, impl: str | None = None, rule: Rule = FLASHINFER_MXFP4
) -> list[torch.Tensor]:
    """:func:`fake_quantize` of each tensor of a list (e.g. every expert weight of a
    TEGroupedLinear). With the Triton kernel all tensors go through ONE launch (the outputs are
    views into one buffer); the reference loops. Every tensor must share one dtype and device
    (else ValueError naming the entry). The kernel's pointer table is built for this call only:
    for a module's persistent weights use :class:`GroupedFakeQuantizer`, which keeps it.
    """
    check_rule(rule)
    if torch.compiler.is_compiling():
        xs = list(xs)
        if not xs:
            return []
        flat = ops.fake_quantize_many(xs, block_size, impl, rule.name)
        return [part.view(x.shape) for part, x in zip(flat.split([x.numel() for x in xs]), xs)]
    return backends.fake_quantize_many(xs, block_size, impl, rule)


def quantize_many(
    xs, block_size: int = DEFAULT_BLOCK_SIZE, *, impl: str | None = None, rule: Rule = FLASHINFER_MXFP4
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`quantize` of each tensor of a list: ``[(codes, scales), ...]`` in order, each with the
    shapes of :func:`quantize` (for the weight export). With the Triton kernel all tensors go through
    ONE launch; the reference loops. One dtype and device for the list; non-finite input raises
    ValueError naming ``xs[i]``. Under ``torch.compile`` this is one ``quantize`` op per tensor.
    """
    check_rule(rule)
    if torch.compiler.is_compiling():
        return [ops.quantize(x, block_size, impl, rule.name) for x in xs]
    return backends.quantize_many(xs, block_size, impl, rule)
