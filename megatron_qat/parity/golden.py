"""Golden MXFP4 model in NumPy, written independently of :mod:`megatron_qat.mxfp4`, for the three
E2M1 rules of :mod:`megatron_qat.numerics.rules` (FlashInfer's, the default; vLLM's online "even"
scale; FlashInfer's scale with ties toward zero), chosen by plain arguments (``scale``, ``ties``,
``ftz``) so that this module imports nothing of the package.

It imports nothing from ``megatron_qat.mxfp4`` and uses different methods at every step, so
that agreement between the two is evidence rather than a tautology:

==========================  =====================================  ==============================
step (FlashInfer order)     megatron_qat.numerics.reference            this module
==========================  =====================================  ==============================
scale p = amax * RN(1/6)    torch float32 multiply                  numpy float32 multiply
E8M0 byte = ceil(log2 p)    exponent field + (mantissa != 0)        ``np.frexp`` (mantissa == 0.5?)
multiplier 2**(127-byte)    built from float32 bits                 ``np.ldexp`` in float32
E2M1 RNE, satfinite         count of threshold crossings            nearest entry of the value
                                                                    table, ties to the even code
decode                      LUT * bits-built 2**(byte-127)          float64 product, cast to f32
==========================  =====================================  ==============================

Mimicked upstream: FlashInfer 0.7.2 ``fp4_quantize(x, None, 32, True, is_sf_swizzled_layout=False)``
(``cvt_warp_fp16_to_fp4<T, 32, UE8M0_SF=true>``, built with ``-use_fast_math``):

1. ``amax`` = max |x| over a block of 32 consecutive elements of a row (exact in float32).
2. ``p = fp32(amax * 0x3E2AAAAB)``; FTZ: ``p < 2**-126`` counts as zero.
3. ``byte = ceil(log2 p) + 127`` clamped to 254; ``p == 0`` gives byte 0.
4. ``v = fp32(x * 2**(127 - byte))`` with FTZ on ``x`` (``|x| < 2**-126`` is a signed zero);
   byte 0 (and 254, whose multiplier 2**-127 is subnormal) multiply by zero.
5. ``code`` = nearest E2M1 value to ``|v|`` (saturating at 6), ties to the even code; the sign
   bit (0x8) is the sign bit of ``x`` (so ``-0.0`` gives 0x8).

The other rules, by their definitions in ``megatron_qat/numerics/rules.py`` (not their code):

- ``scale="even"`` (vLLM 0.33 online ``downcast_to_mxfp``): amax rounded to a power of two, up when
  its significand (in [1, 2)) is at least 1.75, read with ``np.frexp``; ``byte`` = that power's
  biased exponent - 2, at least 0; an amax that rounds past float32 (>= 1.75 * 2**127) gives 254.
  No FTZ: elements are ``x * 2**(127 - byte)`` for every byte (0 -> ``2**127``, 254 -> ``2**-127``).
- ``ties="toward-zero"`` (ModelOpt / Megatron-Bridge): a value exactly halfway between two E2M1
  magnitudes takes the smaller one.

Inputs are float32 NumPy arrays ``[R, K]`` holding exactly the values of the checkpoint tensor
(bf16 / fp16 / fp32 upcast exactly). Rows must be finite (the caller excludes the others).
"""

from __future__ import annotations

import numpy as np

BLOCK = 32
E8M0_BIAS = 127
# RN(1/6) as float32: the bit pattern rcp.approx.ftz.f32(6.0) returns.
RCP6 = np.array([0x3E2AAAAB], dtype=np.uint32).view(np.float32)[0]
SMALLEST_NORMAL = np.float32(2.0**-126)
# E2M1 magnitudes, indexed by the 3-bit magnitude code. Even index == even mantissa bit.
TABLE = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float64)
# Decode table with the sign: index 8 is -0.0 (we keep the sign of zero; FlashInfer's host
# dequantizer does not, see references.py).
DECODE = np.concatenate([TABLE, -TABLE])
_ELEMENTS_PER_STEP = 1 << 18  # bounds the [n, 8] float64 distance matrix to 16 MiB


SCALES = ("ceil", "even")
TIES = ("even", "toward-zero")


def scale_bytes(amax: np.ndarray) -> np.ndarray:
    """Steps 2-3 (FlashInfer's CEIL rule, FTZ): float32 ``amax`` (>= 0) -> int64 E8M0 byte."""
    p = (amax.astype(np.float32) * RCP6).astype(np.float32)
    mant, expo = np.frexp(p)  # p = mant * 2**expo, mant in [0.5, 1) (0 for p == 0)
    exact_power = mant == np.float32(0.5)
    ceil_log2 = np.where(exact_power, expo.astype(np.int64) - 1, expo.astype(np.int64))
    byte = np.clip(ceil_log2 + E8M0_BIAS, 0, 254)
    return np.where(p < SMALLEST_NORMAL, 0, byte)


def even_scale_bytes(amax: np.ndarray) -> np.ndarray:
    """The EVEN rule: float32 ``amax`` (>= 0) -> int64 E8M0 byte (see the module docstring)."""
    mant, expo = np.frexp(amax.astype(np.float64))  # amax = mant * 2**expo, mant in [0.5, 1); 0 -> (0, 0)
    significand, exponent = 2.0 * mant, expo.astype(np.int64) - 1  # amax = significand * 2**exponent
    rounded = np.where(significand >= 1.75, exponent + 1, exponent) + E8M0_BIAS  # biased exponent of the power
    byte = np.where(rounded >= 255, 254, np.maximum(rounded - 2, 0))
    return np.where(amax == 0, 0, byte)


def multipliers(byte: np.ndarray) -> np.ndarray:
    """Step 4's float32 multiplier 2**(127 - byte); zero for byte 0 and byte 254."""
    usable = (byte > 0) & (byte < 254)
    exponent = np.where(usable, E8M0_BIAS - byte, 0).astype(np.int32)
    return np.where(usable, np.ldexp(np.float32(1.0), exponent), np.float32(0.0)).astype(np.float32)


def nearest_e2m1(magnitude: np.ndarray, ties: str = "even") -> np.ndarray:
    """Step 5 on ``|v|`` (float32 or float64, finite or +inf): 3-bit magnitude code, saturating.

    For each value, take the table entries at the smallest distance; when two are equally near
    (a tie), keep the one with the even index (``ties="even"``: E2M1's even mantissa bit) or the
    smaller one (``ties="toward-zero"``)."""
    if ties not in TIES:
        raise ValueError(f"golden: ties must be one of {TIES}, got {ties!r}")
    flat = np.minimum(magnitude.reshape(-1).astype(np.float64), 6.0)
    out = np.empty(flat.shape, dtype=np.uint8)
    # Among the nearest entries the smallest key wins: the parity of the index (even first), or the index.
    preference = np.arange(8) % 2 if ties == "even" else np.arange(8)
    for start in range(0, flat.size, _ELEMENTS_PER_STEP):
        a = flat[start : start + _ELEMENTS_PER_STEP]
        dist = np.abs(a[:, None] - TABLE[None, :])  # exact in float64
        nearest = dist == dist.min(axis=1, keepdims=True)
        key = np.where(nearest, preference[None, :], 8)
        out[start : start + a.size] = np.argmin(key, axis=1)
    return out.reshape(magnitude.shape)


def quantize(x: np.ndarray, *, scale: str = "ceil", ties: str = "even", ftz: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``[R, K]`` (finite, ``K % 32 == 0``) -> (packed codes uint8 ``[R, K/2]``, low nibble
    = even element; scale bytes uint8 ``[R, K/32]``) under the rule ``(scale, ties, ftz)``: FlashInfer's
    is ``("ceil", "even", True)``, vLLM online's ``("even", "even", False)``, ties-down's
    ``("ceil", "toward-zero", True)``; CEIL is modelled with FTZ and EVEN without (as the rules are)."""
    if (scale, ftz) not in (("ceil", True), ("even", False)):
        raise ValueError(f"golden: no E2M1 rule with scale={scale!r}, ftz={ftz} (modelled: ceil with FTZ, even without)")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % BLOCK:
        raise ValueError(f"golden.quantize: need float32 [R, K] with K % {BLOCK} == 0, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("golden.quantize: rows must be finite (exclude non-finite rows first)")
    rows, k = x.shape
    blocks = x.reshape(rows, k // BLOCK, BLOCK)
    amax = np.abs(blocks).max(axis=2)
    if scale == "ceil":
        byte = scale_bytes(amax)
        mult = multipliers(byte)
        flushed = np.where(np.abs(blocks) < SMALLEST_NORMAL, np.float32(0.0), blocks)
        with np.errstate(under="ignore"):
            v = (flushed * mult[:, :, None]).astype(np.float32)
    else:  # exact in float64: a power-of-two multiple of a float32 (a result below 0.25 is code 0 either way)
        byte = even_scale_bytes(amax)
        v = np.ldexp(blocks.astype(np.float64), (E8M0_BIAS - byte)[:, :, None])
    codes = nearest_e2m1(np.abs(v), ties) | (np.signbit(blocks).astype(np.uint8) << 3)
    codes = codes.reshape(rows, k)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return packed, byte.astype(np.uint8)


def unpack(packed: np.ndarray) -> np.ndarray:
    """uint8 ``[R, K/2]`` -> uint8 codes ``[R, K]`` (low nibble first)."""
    out = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


def decode(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 ``[R, K]``: E2M1 value times 2**(byte - 127), exact in float64 then cast (a value
    beyond float32's range becomes +-inf, as an IEEE float32 multiply would). 0x8 -> -0.0;
    scale byte 255 (E8M0 NaN) -> NaN."""
    codes = unpack(packed)
    rows, k = codes.shape
    scale = np.ldexp(1.0, scales.astype(np.int64) - E8M0_BIAS)  # float64, exact
    scale = np.where(scales == 255, np.nan, scale)  # E8M0 0xFF is NaN
    values = DECODE[codes].reshape(rows, k // BLOCK, BLOCK) * scale[:, :, None]
    with np.errstate(over="ignore"):
        return values.reshape(rows, k).astype(np.float32)
