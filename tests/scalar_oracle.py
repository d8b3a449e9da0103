"""A slow, per-element MXFP4 oracle in plain Python floats, for tests only.

Independent of ``megatron_qat.numerics.reference`` in method: the scale exponent comes from
``math.frexp`` (not float bits), elements are scaled in float64 (exact here), and E2M1 rounding is a
nearest-value search over the 8 magnitudes with an explicit ties-to-even-code rule (not thresholds).
Only the constant RN(1/6) (its bits imported from the one definition, megatron_qat.numerics.constants)
and the FTZ rule are shared facts of the FlashInfer arithmetic.
"""

from __future__ import annotations

import math

import numpy as np

from megatron_qat.numerics.constants import RCP_SIX_BITS

MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
RCP_SIX = np.array([RCP_SIX_BITS], dtype=np.uint32).view(np.float32)[0]
TINY = 2.0**-126


def scale_byte(amax: float) -> int:
    p = float(np.float32(amax) * RCP_SIX)  # one float32 multiply, round to nearest
    if p < TINY:  # zero or subnormal: flushed
        return 0
    mant, exp = math.frexp(p)  # p = mant * 2**exp, mant in [0.5, 1)
    ceil_log2 = exp - 1 if mant == 0.5 else exp
    return min(ceil_log2 + 127, 254)


def e2m1_code(v: float) -> int:
    sign = 8 if math.copysign(1.0, v) < 0 else 0
    a = abs(v)
    if a >= 6.0:
        return sign | 7
    best = min(range(8), key=lambda i: (abs(MAGNITUDES[i] - a), i % 2))  # tie -> even code
    return sign | best


def quantize_block(xs: list[float]) -> tuple[list[int], int]:
    byte = scale_byte(max(abs(x) for x in xs))
    mult = 0.0 if byte == 0 else 2.0 ** (127 - byte)
    codes = []
    for x in xs:
        v = math.copysign(0.0, x) if abs(x) < TINY else x * mult
        if v == 0.0:
            v = math.copysign(0.0, x)
        codes.append(e2m1_code(v))
    return codes, byte


def quantize_rows(x: np.ndarray, block_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """float array ``[R, K]`` -> (unpacked codes uint8 ``[R, K]``, bytes uint8 ``[R, K//bs]``)."""
    rows, k = x.shape
    codes = np.zeros((rows, k), dtype=np.uint8)
    scales = np.zeros((rows, k // block_size), dtype=np.uint8)
    for r in range(rows):
        for b in range(k // block_size):
            blk = [float(v) for v in x[r, b * block_size : (b + 1) * block_size]]
            c, s = quantize_block(blk)
            codes[r, b * block_size : (b + 1) * block_size] = c
            scales[r, b] = s
    return codes, scales
