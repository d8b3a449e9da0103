"""A slow, per-element oracle of every quantization rule in plain Python numbers, for tests only.

Independent of ``megatron_qat.numerics.reference`` / ``rounding`` in method:

- the scale exponent comes from ``math.frexp`` (not float bits); the EVEN rule rounds the amax's
  ``frexp`` mantissa at 1.75, not by adding 0x200000 to its bits;
- elements are scaled in float64 (exact here), and the element is found by a nearest-value search
  over the format's magnitudes (E2M1: the 8 of the spec; E4M3: all 127 finite ones, decoded from
  the byte layout of the spec) with an explicit tie rule (to the even code, or to the smaller
  magnitude), not by thresholds or magic-constant adds.

Shared facts of the upstream arithmetic (rules.py cites them): the float32 constants RN(1/6) and
RN(1/448) (imported from the one definition, megatron_qat.numerics.constants), the one float32
multiply that forms ``p``, each rule's flush-to-zero flag and its multipliers for bytes 0 and 254.
"""

from __future__ import annotations

import bisect
import math

import numpy as np

from megatron_qat.numerics.constants import RCP_448_BITS, RCP_SIX_BITS
from megatron_qat.numerics.rules import FLASHINFER_MXFP4, Element, Rule, ScaleRounding, Ties

MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
RCP_SIX = np.array([RCP_SIX_BITS], dtype=np.uint32).view(np.float32)[0]
RCP_448 = np.array([RCP_448_BITS], dtype=np.uint32).view(np.float32)[0]
TINY = 2.0**-126


def _e4m3_magnitude(code: int) -> float:
    """The OCP E4M3 ("fn") spec, read off the 7 magnitude bits: exponent bias 7, subnormals."""
    e, m = code >> 3, code & 7
    return m * 2.0**-9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)


E4M3_MAGNITUDES = tuple(_e4m3_magnitude(c) for c in range(127))  # 0x7F is NaN
E4M3_MAX = E4M3_MAGNITUDES[-1]
assert E4M3_MAX == 448.0 and all(a < b for a, b in zip(E4M3_MAGNITUDES, E4M3_MAGNITUDES[1:]))


def _ceil_log2(p: float) -> int:
    mant, exp = math.frexp(p)  # p = mant * 2**exp, mant in [0.5, 1)
    return exp - 1 if mant == 0.5 else exp


def scale_byte(amax: float, rule: Rule = FLASHINFER_MXFP4) -> int:
    if rule.scale is ScaleRounding.EVEN:
        if amax < TINY:  # zero or subnormal amax: the rounded amax is 0 or 2**-126; scale 2**-127
            return 0
        mant, exp = math.frexp(amax)
        e = exp - 1 + (1 if 2 * mant >= 1.75 else 0)  # power of two, rounded up at mantissa 1.75
        return 254 if e >= 128 else max(e - 2 + 127, 0)
    rcp = RCP_SIX if rule.element is Element.E2M1 else RCP_448
    p = float(np.float32(amax) * rcp)  # one float32 multiply, round to nearest
    if p == 0.0 or (rule.ftz and p < TINY):  # zero, or subnormal flushed
        return 0
    return min(max(_ceil_log2(p) + 127, 0), 254)


def multiplier(byte: int, rule: Rule = FLASHINFER_MXFP4) -> float:
    if rule.scale is ScaleRounding.EVEN:
        return 2.0 ** (127 - byte)  # byte 0 -> 2**127, byte 254 -> 2**-127
    return 0.0 if byte in (0, 254) else 2.0 ** (127 - byte)


def _nearest(a: float, mags, ties: Ties) -> int:
    """Index of the magnitude nearest to ``a`` (``a`` <= the largest); a tie goes to the even index
    (``Ties.EVEN``) or the smaller magnitude (``Ties.TOWARD_ZERO``)."""
    hi = bisect.bisect_left(mags, a)
    if hi < len(mags) and mags[hi] == a:
        return hi
    lo = hi - 1
    dlo, dhi = a - mags[lo], mags[hi] - a
    if dlo != dhi:
        return lo if dlo < dhi else hi
    if ties is Ties.TOWARD_ZERO:
        return lo
    return lo if lo % 2 == 0 else hi


def e2m1_code(v: float, ties: Ties = Ties.EVEN) -> int:
    sign = 8 if math.copysign(1.0, v) < 0 else 0
    a = abs(v)
    if a >= 6.0:
        return sign | 7
    return sign | _nearest(a, MAGNITUDES, ties)


def e4m3_code(v: float) -> int:
    sign = 0x80 if math.copysign(1.0, v) < 0 else 0
    return sign | _nearest(min(abs(v), E4M3_MAX), E4M3_MAGNITUDES, Ties.EVEN)


def element_code(v: float, rule: Rule = FLASHINFER_MXFP4) -> int:
    return e4m3_code(v) if rule.element is Element.E4M3 else e2m1_code(v, rule.ties)


def element_value(code: int, rule: Rule = FLASHINFER_MXFP4) -> float:
    if rule.element is Element.E4M3:
        mag = E4M3_MAGNITUDES[code & 0x7F]
        return -mag if code & 0x80 else mag
    return -MAGNITUDES[code & 7] if code & 8 else MAGNITUDES[code & 7]


def quantize_block(xs: list[float], rule: Rule = FLASHINFER_MXFP4) -> tuple[list[int], int]:
    byte = scale_byte(max(abs(x) for x in xs), rule)
    mult = multiplier(byte, rule)
    codes = []
    for x in xs:
        if rule.ftz and abs(x) < TINY:
            v = math.copysign(0.0, x)
        else:
            v = math.copysign(abs(x) * mult, x)  # float64: exact; keeps the sign of a zero product
        codes.append(element_code(v, rule))
    return codes, byte


def quantize_rows(x: np.ndarray, block_size: int = 32, rule: Rule = FLASHINFER_MXFP4) -> tuple[np.ndarray, np.ndarray]:
    """float array ``[R, K]`` -> (unpacked codes uint8 ``[R, K]``, bytes uint8 ``[R, K//bs]``)."""
    rows, k = x.shape
    codes = np.zeros((rows, k), dtype=np.uint8)
    scales = np.zeros((rows, k // block_size), dtype=np.uint8)
    for r in range(rows):
        for b in range(k // block_size):
            blk = [float(v) for v in x[r, b * block_size : (b + 1) * block_size]]
            c, s = quantize_block(blk, rule)
            codes[r, b * block_size : (b + 1) * block_size] = c
            scales[r, b] = s
    return codes, scales


def fake_values(codes: np.ndarray, scales: np.ndarray, block_size: int = 32, rule: Rule = FLASHINFER_MXFP4) -> np.ndarray:
    """float64 ``[R, K]``: ``element(code) * 2**(byte - 127)`` (exact in float64)."""
    out = np.zeros(codes.shape, dtype=np.float64)
    for (r, k), c in np.ndenumerate(codes):
        out[r, k] = element_value(int(c), rule) * 2.0 ** (int(scales[r, k // block_size]) - 127)
    return out
