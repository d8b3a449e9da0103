"""Pure-PyTorch reference of FlashInfer's MXFP4 quantizer, written in the kernel's order.

Mimicked upstream: FlashInfer 0.7.2 ``fp4_quantize(x, None, sf_vec_size=32, sf_use_ue8m0=True,
is_sf_swizzled_layout=False)``, i.e. ``cvt_warp_fp16_to_fp4<T, 32, UE8M0_SF=true>`` in
``csrc/nv_internal/tensorrt_llm/kernels/quantization_utils.cuh``, JIT-built with
``-use_fast_math`` (every float32 multiply flushes subnormal inputs and results to zero).
docs/numerics.md states the rule with worked examples.

Per block of ``block_size`` consecutive elements along the last dim:

a. ``amax = max |x|`` (exact in float32 for bf16/fp16 input).
b. ``p = amax * RN(1/6)`` in float32 (``rcp.approx.ftz(6.0)`` is 0x3E2AAAAB); a subnormal ``p``
   is flushed to 0.
c. ``byte = ceil(log2 p) + 127`` saturated to [0, 254] (``__nv_cvt_float_to_e8m0``, satfinite,
   round toward +inf); ``p == 0`` gives byte 0.
d. ``v = x * 2**(127 - byte)`` in float32 with FTZ (byte 0 uses 0 as the multiplier), then
   E2M1 round-to-nearest-even with saturation at +-6 (``cvt.rn.satfinite.e2m1x2.f32``); the sign
   bit is the sign of ``x`` (so -0 and small negatives give 0x8).

Everything is vectorised and runs on any device. Memory: rows are processed in chunks of at most
``_CHUNK_ELEMENTS`` elements, so the float32 temporaries stay bounded (no float64 anywhere).
``fake_quantize_reference`` never reads a value back to the host and never copies from it (so it
can run inside a CUDA graph capture); ``quantize_reference`` reads one bool back for its
non-finite check.

Empty tensors: any ``[..., K]`` with ``K % block_size == 0`` is accepted, ``K = 0`` and zero rows
included; the outputs then have zero elements and the shapes of the contract (codes ``[..., K//2]``,
scales ``[..., K//block_size]``, fake-quant values ``[..., K]``), as in the Triton kernel.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .format import (
    CANONICAL_NAN_BITS,
    DEFAULT_BLOCK_SIZE,
    E8M0_BIAS,
    FLT_MIN_NORMAL,
    INT_VIEW_DTYPES,
    RCP_SIX,
    check_block_size,
    check_finite,
    check_input,
    e2m1_lut,
    e8m0_to_float32,
    pack_nibbles,
    unpack_nibbles,
)

_CHUNK_ELEMENTS = 1 << 24  # 16M elements -> 64 MiB per float32 temporary

# E2M1 round-to-nearest-even decision points on |v|. ``>`` where the tie goes DOWN to the even
# code, ``>=`` where it goes UP to the even code. The code is the number of thresholds passed.
#   tie 0.25 -> 0 (code 0)   tie 0.75 -> 1.0 (code 2)   tie 1.25 -> 1.0 (code 2)
#   tie 1.75 -> 2.0 (code 4) tie 2.5  -> 2.0 (code 4)   tie 3.5  -> 4.0 (code 6)   tie 5 -> 4.0 (code 6)
# Anything above 5 (including > 6) saturates to code 7 (6.0).
_RNE_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def e8m0_ceil_from_float32(p: torch.Tensor) -> torch.Tensor:
    """Step c: float32 ``p >= 0`` -> int32 E8M0 byte = ceil(log2 p) + 127, saturated to [0, 254].

    Read off the bits: a power of two keeps its exponent field, anything with mantissa bits rounds
    up one. Zero and subnormal ``p`` (flushed by FTZ) give 0. ``+inf`` gives 254, as
    ``__nv_cvt_float_to_e8m0`` does with satfinite (only reachable for non-finite input).
    """
    bits = p.contiguous().view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    mantissa_nonzero = (bits & 0x7FFFFF) != 0
    byte = exponent + mantissa_nonzero.to(torch.int32)
    byte = torch.where(exponent == 0, torch.zeros_like(byte), byte)
    return byte.clamp_(max=254)


def _inverse_scale(byte: torch.Tensor) -> torch.Tensor:
    """Step d's multiplier: float32 2**(127 - byte) for bytes 1..253, built from bits (exact).

    Byte 0 -> 0.0 (FlashInfer's ``SFValue != 0 ? ... : 0``); byte 254 -> 0.0 because 2**-127 is
    subnormal and the fast-math reciprocal flushes it (never reached by finite fp32/bf16/fp16)."""
    inv_bits = (2 * E8M0_BIAS - byte) << 23
    inv = inv_bits.view(torch.float32)
    valid = (byte > 0) & (byte < 254)
    return torch.where(valid, inv, torch.zeros_like(inv))


def e2m1_round_codes(v: torch.Tensor) -> torch.Tensor:
    """Step d's conversion: float32 ``v`` -> uint8 E2M1 code (RNE, satfinite, sign of ``v`` kept).

    ``v`` must be NaN-free (callers handle non-finite blocks). ``|v| > 6`` and inf saturate to 0x7.
    """
    a = v.abs()
    code = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for threshold, inclusive in _RNE_THRESHOLDS:
        code += (a >= threshold) if inclusive else (a > threshold)
    code |= torch.signbit(v).to(torch.uint8) << 3
    return code


def _quantize_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 ``[R, nb, bs]`` -> (codes uint8 ``[R, nb, bs]``, bytes int32 ``[R, nb]``,
    non-finite mask bool ``[R, nb]``). Codes of non-finite blocks are meaningless."""
    # a. amax of each block (NaN propagates through amax; that marks the block non-finite).
    amax = blocks.abs().amax(dim=-1)
    nonfinite = ~torch.isfinite(amax)
    # b. p = amax * RN(1/6): one float32 multiply, round to nearest (the Python float RCP_SIX is
    # exactly the float32 constant); FTZ is applied on the bits in step c.
    p = amax * RCP_SIX
    # c. E8M0 byte, rounded toward +inf, satfinite.
    byte = e8m0_ceil_from_float32(p)
    # d. scale the elements by the exact power of two; FTZ: subnormal x is a signed zero.
    inv = _inverse_scale(byte)
    v = blocks * inv.unsqueeze(-1)
    v = torch.where(blocks.abs() < FLT_MIN_NORMAL, blocks * 0.0, v)  # keeps the sign of zero
    v = torch.where(nonfinite.unsqueeze(-1), torch.zeros_like(v), v)  # keep codes NaN-free
    codes = e2m1_round_codes(v)
    return codes, byte, nonfinite


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


def quantize_reference(
    x: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, *, name: str = "x"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`megatron_qat.mxfp4.quantize` (same contract, no dispatch); ``name`` is
    the tensor's name in error messages."""
    check_block_size(block_size)
    check_input(x, block_size, name)
    check_finite(x, name)
    k = x.shape[-1]
    lead = x.shape[:-1]
    x2d = _rows(x)
    codes = torch.empty((x2d.shape[0], k // 2), dtype=torch.uint8, device=x.device)
    scales = torch.empty((x2d.shape[0], k // block_size), dtype=torch.uint8, device=x.device)

    def run(rs: slice) -> None:
        chunk = x2d[rs].detach().float()
        c, byte, _ = _quantize_blocks(_blocks(chunk, block_size))
        codes[rs] = pack_nibbles(c.reshape(chunk.shape))
        scales[rs] = byte.to(torch.uint8)

    _map_row_chunks(x2d, run)
    return codes.reshape(*lead, k // 2), scales.reshape(*lead, k // block_size)


def fake_quantize_reference(x: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, *, name: str = "x") -> torch.Tensor:
    """Reference of :func:`megatron_qat.mxfp4.fake_quantize`: quantize -> dequantize in ``x.dtype``.

    Finite blocks: bitwise equal to ``dequantize(*quantize(x), dtype=x.dtype)``. A block holding
    NaN or +-inf comes out all NaN, the canonical quiet NaN of ``CANONICAL_NAN_BITS`` (FlashInfer
    would encode it; we keep divergence visible).
    Output is a new contiguous tensor with ``x``'s shape, dtype and device; it does not require
    grad (:func:`megatron_qat.mxfp4.fake_quantize_ste` is the differentiable form).
    """
    check_block_size(block_size)
    check_input(x, block_size, name)
    x2d = _rows(x)
    out = torch.empty(x2d.shape, dtype=x.dtype, device=x.device)
    lut = e2m1_lut(x.device)
    nan_bits = CANONICAL_NAN_BITS[x.dtype]

    def run(rs: slice) -> None:
        chunk = x2d[rs].detach().float()
        c, byte, nonfinite = _quantize_blocks(_blocks(chunk, block_size))
        values = (lut[c.long()] * e8m0_to_float32(byte).unsqueeze(-1)).to(x.dtype)
        ints = torch.where(nonfinite.unsqueeze(-1), nan_bits, values.view(INT_VIEW_DTYPES[x.dtype]))
        out[rs] = ints.view(x.dtype).reshape(chunk.shape)

    _map_row_chunks(x2d, run)
    return out.reshape(x.shape)


def dequantize_reference(
    codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, block_size: int = DEFAULT_BLOCK_SIZE
) -> torch.Tensor:
    """Reference of :func:`megatron_qat.mxfp4.dequantize`."""
    check_block_size(block_size)
    _check_packed(codes, scales, block_size, dtype)
    k = codes.shape[-1] * 2
    lut = e2m1_lut(codes.device)
    values = lut[unpack_nibbles(codes).long()].reshape(*codes.shape[:-1], k // block_size, block_size)
    values = values * e8m0_to_float32(scales).unsqueeze(-1)
    return values.reshape(*codes.shape[:-1], k).to(dtype)


def _check_packed(codes: torch.Tensor, scales: torch.Tensor, block_size: int, dtype: torch.dtype) -> None:
    for name, t in (("codes", codes), ("scales", scales)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a uint8 tensor, got {got}")
        if t.dim() == 0:
            raise ValueError(f"{name} must have shape [..., n], got a 0-d tensor")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    k = codes.shape[-1] * 2
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
