"""MX storage formats: E2M1 element codes (MXFP4), E4M3 element bytes (MXFP8), E8M0 scale bytes,
nibble packing.

The one home of the format's constants (the plain integers live in the torch-free
:mod:`megatron_qat.numerics.constants` and are re-exported here), the torch-typed maps derived from
them, bit helpers and input validation shared by the reference, the kernels, the op layer and the
exporters. Nothing here decides *how* a value is rounded; that is
:mod:`megatron_qat.numerics.rounding` (per rule, :mod:`megatron_qat.numerics.rules`).

E2M1 code (4 bits): bit 3 is the sign, bits 2..0 select a magnitude from
``E2M1_MAGNITUDES`` = [0, 0.5, 1, 1.5, 2, 3, 4, 6]. Code 0x8 is -0.0.

E4M3 element (``float8_e4m3fn``, MXFP8): one byte per element, bit 7 the sign, 4 exponent bits
(bias 7), 3 mantissa bits; max 448 (0x7E), subnormals ``m * 2**-9``, 0x7F/0xFF NaN (never produced).

E8M0 scale byte: 2 ** (byte - 127); byte 255 is NaN (never produced for finite input).

Packing (FlashInfer ``fp4_quantize``, OCP MX, gpt-oss ``*_blocks``, compressed-tensors
``weight_packed``): element ``2i`` of a row goes to the LOW nibble of byte ``i``, element
``2i+1`` to the HIGH nibble.
"""

from __future__ import annotations

import struct
from typing import Iterable

import torch

from .constants import (
    DEFAULT_BLOCK_SIZE,
    E8M0_BIAS,
    E8M0_NAN,
    NAN_BITS_BF16,
    NAN_BITS_FP16,
    NAN_BITS_FP32,
    RCP_SIX_BITS,
)
from .rules import Element

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "E8M0_BIAS",
    "E8M0_NAN",
    "RCP_SIX_BITS",
    "RCP_SIX",
    "FLT_MIN_NORMAL",
    "E2M1_MAGNITUDES",
    "SUPPORTED_DTYPES",
    "CANONICAL_NAN_BITS",
    "INT_VIEW_DTYPES",
    "e2m1_lut",
    "e4m3_lut",
    "element_lut",
    "float32_from_bits",
    "pack_nibbles",
    "unpack_nibbles",
    "e8m0_to_float32",
    "check_block_size",
    "check_input",
    "check_group",
    "check_finite",
]

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)



def float32_from_bits(bits: int) -> float:
    """The float32 with these bits, as a Python float (exact; no tensor, no device sync)."""
    return struct.unpack("<f", struct.pack("<I", bits))[0]


# RN(1/6) as a Python float, decoded once from its bits.
RCP_SIX = float32_from_bits(RCP_SIX_BITS)
FLT_MIN_NORMAL = 2.0**-126  # anything smaller (in magnitude) is flushed to zero by FTZ

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The integer dtype of the same width: every bit-exact comparison and every bit-level write uses it.
INT_VIEW_DTYPES = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
# fake_quantize writes exactly this quiet NaN for every element of a non-finite block.
CANONICAL_NAN_BITS = {torch.bfloat16: NAN_BITS_BF16, torch.float16: NAN_BITS_FP16, torch.float32: NAN_BITS_FP32}


def e2m1_lut(device: torch.device | str | None = None) -> torch.Tensor:
    """float32 ``[16]`` table: code -> value, sign bit included (index 8 is -0.0).

    Built on ``device`` from ``arange`` (no host-to-device copy, so it is safe inside a CUDA graph
    capture): twice the magnitude of code ``m`` is ``m`` for m < 2, else ``(2 + (m & 1)) << ((m >> 1) - 1)``,
    which gives ``E2M1_MAGNITUDES`` exactly.
    """
    m = torch.arange(8, device=device)
    twice = torch.where(m < 2, m, (2 + (m & 1)) << ((m >> 1) - 1).clamp(min=0))
    mags = twice.to(torch.float32) * 0.5
    return torch.cat([mags, -mags])


def e4m3_lut(device: torch.device | str | None = None) -> torch.Tensor:
    """float32 ``[256]`` table: E4M3 (``float8_e4m3fn``) byte -> value; 0x80 is -0.0, 0x7F/0xFF NaN.

    Built on ``device`` from ``arange`` (no host-to-device copy): exponent field ``e`` and mantissa
    ``m``; normal ``(1 + m/8) * 2**(e - 7)`` written as float32 bits ``(e + 120) << 23 | m << 20``,
    subnormal (``e == 0``) ``m * 2**-9``."""
    b = torch.arange(256, device=device, dtype=torch.int32)
    e, m = (b >> 3) & 0xF, b & 0x7
    normal = (((e + 120) << 23) | (m << 20)).view(torch.float32)
    mags = torch.where(e == 0, m.to(torch.float32) * 2.0**-9, normal)
    mags = torch.where((b & 0x7F) == 0x7F, torch.full_like(mags, float("nan")), mags)
    return torch.where(b >= 128, -mags, mags)


def element_lut(element, device: torch.device | str | None = None) -> torch.Tensor:
    """The decode table of an :class:`~megatron_qat.numerics.rules.Element`: code -> float32 value."""
    return e4m3_lut(device) if element is Element.E4M3 else e2m1_lut(device)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., K]`` codes (each < 16) -> uint8 ``[..., K // 2]``, even element in the low nibble."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack_nibbles: codes must be uint8, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles: last dim of codes {tuple(codes.shape)} must be even")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., K // 2]`` -> uint8 ``[..., K]`` codes; inverse of :func:`pack_nibbles`."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_nibbles: packed codes must be uint8, got {packed.dtype}")
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def e8m0_to_float32(scales: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 bytes -> float32 ``2 ** (byte - 127)``, built from bits so byte 0 gives the
    subnormal 2**-127 exactly and byte 255 gives NaN."""
    b = scales.to(torch.int32)
    bits = torch.where(b == 0, torch.full_like(b, 0x00400000), b << 23)
    bits = torch.where(b == E8M0_NAN, torch.full_like(b, NAN_BITS_FP32), bits)
    return bits.view(torch.float32)


def check_block_size(block_size: int, name: str = "block_size") -> int:
    """A positive even integer (32 is what FlashInfer implements; others are ablations)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"{name} must be an int, got {block_size!r}")
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"{name} must be a positive even integer, got {block_size}")
    return block_size


def check_input(x: torch.Tensor, block_size: int, name: str = "x") -> None:
    """Validate a tensor to be quantized: float16/bfloat16/float32, rank >= 1, K % block_size == 0."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {x.dtype}; MXFP4 quantization accepts torch.float16, torch.bfloat16 "
            "or torch.float32"
        )
    if x.dim() == 0:
        raise ValueError(f"{name} is a 0-d tensor; MXFP4 needs shape [..., K] with K % {block_size} == 0")
    k = x.shape[-1]
    if k % block_size:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}: its last dim K={k} is not a multiple of the MXFP4 "
            f"block size {block_size} (blocks run along the last, input-features dim)"
        )


def check_group(xs: Iterable[torch.Tensor], block_size: int, name: str = "xs") -> list[torch.Tensor]:
    """Validate a list of tensors for a grouped call: each passes :func:`check_input` (named
    ``xs[i]``) and all share ``xs[0]``'s dtype and device. Returns the list (an empty one is fine)."""
    if isinstance(xs, torch.Tensor):
        raise TypeError(f"{name} must be a list of tensors, got one torch.Tensor of shape {tuple(xs.shape)}")
    xs = list(xs)
    for i, t in enumerate(xs):
        check_input(t, block_size, f"{name}[{i}]")
        if t.dtype != xs[0].dtype or t.device != xs[0].device:
            raise ValueError(
                f"{name}[{i}] is {t.dtype} on {t.device} but {name}[0] is {xs[0].dtype} on {xs[0].device}; "
                "a grouped MXFP4 call needs one dtype and one device for the whole list"
            )
    return xs


def check_finite(x: torch.Tensor, name: str = "x") -> None:
    """Raise ValueError naming ``name``, the count and the first index of NaN/Inf in ``x``.

    ``quantize`` refuses non-finite input (docs/numerics.md). The check reads one bool back from
    the device (a host sync), so it is for quantize/export, never for the fake-quant hot path.
    """
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero()
    first = tuple(int(i) for i in bad[0])
    raise ValueError(
        f"{name} of shape {tuple(x.shape)} holds {bad.shape[0]} non-finite value(s) "
        f"(first at index {first}: {x[first].item()}); MXFP4 quantize refuses NaN/Inf"
    )
