"""MXFP4 numerics, bit-identical to FlashInfer ``fp4_quantize(sf_vec_size=32, sf_use_ue8m0=True)``.

Public contract (docs/numerics.md states the rule):

- :func:`quantize` ``x [..., K] -> (codes uint8 [..., K//2], scales uint8 [..., K//block_size])``
- :func:`dequantize` ``(codes, scales) -> values``
- :func:`fake_quantize` quantize -> dequantize in ``x.dtype`` (non-finite blocks come out NaN)
- :func:`fake_quantize_ste` the same with a straight-through (identity) gradient

``impl`` picks the implementation: ``"reference"`` (vectorised PyTorch, any device) or
``"triton"`` (fused kernel, CUDA). ``None`` follows ``MEGATRON_QAT_KERNEL`` and otherwise uses the
kernel on CUDA tensors when it can run there, the reference elsewhere.
"""

from __future__ import annotations

import torch

from .dispatch import resolve_impl
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
from ..numerics.reference import dequantize_reference, fake_quantize_reference, quantize_reference
from .ste import fake_quantize_ste

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "E2M1_MAGNITUDES",
    "E8M0_BIAS",
    "SUPPORTED_DTYPES",
    "quantize",
    "dequantize",
    "fake_quantize",
    "fake_quantize_ste",
    "fake_quantize_many",
    "GroupedFakeQuantizer",
    "e2m1_lut",
    "e8m0_to_float32",
    "pack_nibbles",
    "unpack_nibbles",
]


def quantize(x: torch.Tensor, block_size: int = 32, *, impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4-quantize ``x`` exactly as FlashInfer does.

    Args:
        x: float16, bfloat16 or float32, shape ``[..., K]`` with ``K % block_size == 0``, any device.
        block_size: elements per scale along the last dim (32 = FlashInfer; others are ablations).
    Returns:
        ``codes`` uint8 ``[..., K // 2]`` (element 2i in the low nibble, 2i+1 in the high nibble,
        bit 3 of a nibble is the sign) and ``scales`` uint8 ``[..., K // block_size]`` (E8M0,
        bias 127): FlashInfer's ``fp4_quantize(x, None, 32, True, is_sf_swizzled_layout=False)``.
    Raises:
        ValueError: ``K % block_size != 0`` or non-finite input (the message says where).
    """
    if resolve_impl(x, impl) == "triton":
        from ..kernels import triton_qdq

        return triton_qdq.quantize(x, block_size)
    return quantize_reference(x, block_size)


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, block_size: int = 32
) -> torch.Tensor:
    """Decode MXFP4: ``value = E2M1(code) * 2 ** (scale - 127)``, computed exactly in float32 and
    rounded to ``dtype`` (IEEE: a value beyond the dtype's range becomes +-inf). Code 0x8 gives -0.0;
    scale byte 255 (E8M0 NaN) gives NaN.
    """
    return dequantize_reference(codes, scales, dtype, block_size)


def fake_quantize(x: torch.Tensor, block_size: int = 32, *, impl: str | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` to MXFP4 in one call; same shape, dtype and device as ``x``.

    For finite input the result equals ``dequantize(*quantize(x, block_size), dtype=x.dtype,
    block_size=block_size)`` bit for bit. A block holding NaN or +-inf comes out all NaN: we differ
    from FlashInfer (which encodes NaN as +6) on purpose, so that a diverging weight stays visible.
    Never synchronises with the host (safe on the training hot path).
    """
    if resolve_impl(x, impl) == "triton":
        from ..kernels import triton_qdq

        return triton_qdq.fake_quantize(x, block_size)
    return fake_quantize_reference(x, block_size)


def fake_quantize_many(xs, block_size: int = 32, *, impl: str | None = None) -> list[torch.Tensor]:
    """:func:`fake_quantize` of each tensor of a list (e.g. every expert weight of a
    TEGroupedLinear). With the Triton kernel all tensors go through ONE launch; the reference loops.
    Every tensor must share one dtype and device.
    """
    xs = list(xs)
    if not xs:
        return []
    if resolve_impl(xs[0], impl) == "triton":
        from ..kernels import triton_qdq

        return triton_qdq.fake_quantize_many(xs, block_size)
    return [fake_quantize_reference(x, block_size) for x in xs]


class GroupedFakeQuantizer:
    """Fake-quantize one fixed set of tensors (the expert weights of one TEGroupedLinear) again and
    again: ``GroupedFakeQuantizer(block_size)(weights) -> list`` equals
    ``fake_quantize_many(weights, block_size)``. One instance per module: whatever per-launch state
    the kernel needs (the grouped pointer table) lives here, with the module, not in a global cache.
    """

    def __init__(self, block_size: int = 32, *, impl: str | None = None):
        self.block_size = block_size
        self.impl = impl

    def __call__(self, xs) -> list[torch.Tensor]:
        return fake_quantize_many(xs, self.block_size, impl=self.impl)
