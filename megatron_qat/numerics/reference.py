"""Pure-PyTorch reference of every quantization rule, written in the kernels' order.

The rules (:mod:`megatron_qat.numerics.rules`) and their upstream sources: ``FLASHINFER_MXFP4``
(the default: FlashInfer 0.7.2 ``fp4_quantize(x, None, sf_vec_size=32, sf_use_ue8m0=True,
is_sf_swizzled_layout=False)``, ``cvt_warp_fp16_to_fp4<T, 32, UE8M0_SF=true>`` built with
``-use_fast_math``), ``VLLM_ONLINE_MXFP4`` (vLLM 0.33 ``downcast_to_mxfp``), ``TIES_DOWN_MXFP4``
(ModelOpt-style ties) and ``FLASHINFER_MXFP8`` (FlashInfer ``mxfp8_quantize`` CuTe-DSL).
docs/numerics.md states each with worked examples; :mod:`megatron_qat.numerics.rounding` holds the
steps. For the default rule, per block of ``block_size`` consecutive elements along the last dim:

a. ``amax = max |x|`` (exact in float32 for bf16/fp16 input).
b. ``p = amax * RN(1/6)`` in float32 (``rcp.approx.ftz(6.0)`` is 0x3E2AAAAB); a subnormal ``p``
   is flushed to 0.
c. ``byte = ceil(log2 p) + 127`` saturated to [0, 254] (``__nv_cvt_float_to_e8m0``, satfinite,
   round toward +inf); ``p == 0`` gives byte 0.
d. ``v = x * 2**(127 - byte)`` in float32 with FTZ (byte 0 uses 0 as the multiplier), then
   E2M1 round-to-nearest-even with saturation at +-6 (``cvt.rn.satfinite.e2m1x2.f32``); the sign
   bit is the sign of ``x`` (so -0 and small negatives give 0x8).

Storage: E2M1 codes are packed two per byte (element ``2i`` in the low nibble), ``[..., K // 2]``;
E4M3 codes are one byte per element, ``[..., K]``; scales ``[..., K // block_size]`` E8M0 bytes.

Everything is vectorised and runs on any device. Memory: rows are processed in chunks of at most
``_CHUNK_ELEMENTS`` elements, so the float32 temporaries stay bounded (no float64 anywhere).
``fake_quantize_reference`` never reads a value back to the host and never copies from it (so it
can run inside a CUDA graph capture); ``quantize_reference`` reads one bool back for its
non-finite check.

Empty tensors: any ``[..., K]`` with ``K % block_size == 0`` is accepted, ``K = 0`` and zero rows
included; the outputs then have zero elements and the shapes of the contract, as in the kernel.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .format import (
    CANONICAL_NAN_BITS,
    DEFAULT_BLOCK_SIZE,
    INT_VIEW_DTYPES,
    check_block_size,
    check_finite,
    check_input,
    e8m0_to_float32,
    element_lut,
    pack_nibbles,
    unpack_nibbles,
)
from .rounding import e2m1_round_codes, e8m0_ceil_from_float32, quantize_blocks
from .rules import FLASHINFER_MXFP4, Element, Rule

__all__ = [
    "quantize_reference",
    "fake_quantize_reference",
    "dequantize_reference",
    "e8m0_ceil_from_float32",
    "e2m1_round_codes",
]

_CHUNK_ELEMENTS = 1 << 24  # 16M elements -> 64 MiB per float32 temporary


def check_rule(rule) -> Rule:
    """``rule`` must be a :class:`~megatron_qat.numerics.rules.Rule` (TypeError otherwise)."""
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a megatron_qat.numerics.rules.Rule (e.g. FLASHINFER_MXFP4), got {rule!r}")
    return rule


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` as ``[R, K]`` with R given explicitly (``reshape(-1, 0)`` is ambiguous for K = 0)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _map_row_chunks(x2d: torch.Tensor, fn: Callable[[slice], None]) -> None:
    """Call ``fn(row_slice)`` over row chunks of a ``[R, K]`` view, each at most _CHUNK_ELEMENTS."""
    rows, k = x2d.shape
    step = max(1, _CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, rows, step):
        fn(slice(start, min(rows, start + step)))


def _blocks(chunk: torch.Tensor, block_size: int) -> torch.Tensor:
    """float32 ``[r, K]`` -> ``[r, K // block_size, block_size]`` (explicit sizes: K may be 0)."""
    return chunk.reshape(chunk.shape[0], chunk.shape[1] // block_size, block_size)


def _store_codes(codes: torch.Tensor, rule: Rule) -> torch.Tensor:
    """Unpacked uint8 codes ``[r, K]`` -> the storage layout (E2M1: nibble pairs, E4M3: as is)."""
    return pack_nibbles(codes) if rule.element is Element.E2M1 else codes


def quantize_reference(
    x: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, *, rule: Rule = FLASHINFER_MXFP4, name: str = "x"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`megatron_qat.mxfp4.quantize` (same contract, no dispatch): ``(codes,
    scales)``, codes uint8 ``[..., K // 2]`` (E2M1) or ``[..., K]`` (E4M3), scales uint8
    ``[..., K // block_size]``; ``name`` is the tensor's name in error messages."""
    check_rule(rule)
    check_block_size(block_size)
    check_input(x, block_size, name)
    check_finite(x, name)
    k = x.shape[-1]
    lead = x.shape[:-1]
    x2d = _rows(x)
    kc = k // rule.codes_per_byte
    codes = torch.empty((x2d.shape[0], kc), dtype=torch.uint8, device=x.device)
    scales = torch.empty((x2d.shape[0], k // block_size), dtype=torch.uint8, device=x.device)

    def run(rs: slice) -> None:
        chunk = x2d[rs].detach().float()
        c, byte, _ = quantize_blocks(_blocks(chunk, block_size), rule)
        codes[rs] = _store_codes(c.reshape(chunk.shape), rule)
        scales[rs] = byte.to(torch.uint8)

    _map_row_chunks(x2d, run)
    return codes.reshape(*lead, kc), scales.reshape(*lead, k // block_size)


def fake_quantize_reference(
    x: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, *, rule: Rule = FLASHINFER_MXFP4, name: str = "x"
) -> torch.Tensor:
    """Reference of :func:`megatron_qat.mxfp4.fake_quantize`: quantize -> dequantize in ``x.dtype``.

    Finite blocks: bitwise equal to ``dequantize(*quantize(x), dtype=x.dtype)``. A block holding
    NaN or +-inf comes out all NaN, the canonical quiet NaN of ``CANONICAL_NAN_BITS`` (the engines
    would encode it; we keep divergence visible).
    Output is a new contiguous tensor with ``x``'s shape, dtype and device; it does not require
    grad (:func:`megatron_qat.mxfp4.fake_quantize_ste` is the differentiable form).
    """
    check_rule(rule)
    check_block_size(block_size)
    check_input(x, block_size, name)
    x2d = _rows(x)
    out = torch.empty(x2d.shape, dtype=x.dtype, device=x.device)
    lut = element_lut(rule.element, x.device)
    nan_bits = CANONICAL_NAN_BITS[x.dtype]

    def run(rs: slice) -> None:
        chunk = x2d[rs].detach().float()
        c, byte, nonfinite = quantize_blocks(_blocks(chunk, block_size), rule)
        values = (lut[c.long()] * e8m0_to_float32(byte).unsqueeze(-1)).to(x.dtype)
        ints = torch.where(nonfinite.unsqueeze(-1), nan_bits, values.view(INT_VIEW_DTYPES[x.dtype]))
        out[rs] = ints.view(x.dtype).reshape(chunk.shape)

    _map_row_chunks(x2d, run)
    return out.reshape(x.shape)


def dequantize_reference(
    codes: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    rule: Rule = FLASHINFER_MXFP4,
) -> torch.Tensor:
    """Reference of :func:`megatron_qat.mxfp4.dequantize`: ``value = element(code) * 2**(byte - 127)``
    exactly in float32, cast to ``dtype``; codes in ``rule``'s storage layout."""
    check_rule(rule)
    check_block_size(block_size)
    _check_packed(codes, scales, block_size, dtype, rule)
    k = codes.shape[-1] * rule.codes_per_byte
    unpacked = unpack_nibbles(codes) if rule.element is Element.E2M1 else codes
    values = element_lut(rule.element, codes.device)[unpacked.long()]
    values = values.reshape(*codes.shape[:-1], k // block_size, block_size) * e8m0_to_float32(scales).unsqueeze(-1)
    return values.reshape(*codes.shape[:-1], k).to(dtype)


def _check_packed(codes: torch.Tensor, scales: torch.Tensor, block_size: int, dtype: torch.dtype, rule: Rule) -> None:
    for name, t in (("codes", codes), ("scales", scales)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a uint8 tensor, got {got}")
        if t.dim() == 0:
            raise ValueError(f"{name} must have shape [..., n], got a 0-d tensor")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    k = codes.shape[-1] * rule.codes_per_byte
    if k % block_size:
        raise ValueError(
            f"codes has shape {tuple(codes.shape)} (K={k}), not a multiple of block_size {block_size}"
        )
    expected = (*codes.shape[:-1], k // block_size)
    if tuple(scales.shape) != expected:
        raise ValueError(
            f"scales has shape {tuple(scales.shape)}; codes of shape {tuple(codes.shape)} with "
            f"block_size {block_size} need scales of shape {expected}"
        )
    if codes.device != scales.device:
        raise ValueError(f"codes is on {codes.device} but scales is on {scales.device}")
