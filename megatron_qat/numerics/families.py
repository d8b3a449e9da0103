"""Input families that drive every branch of the MXFP4 rule, and a bit-level comparison.

Used by the kernel tests (CPU interpreter and GPU) and by the benchmark's correctness check, so
that all three exercise the same cases. Each family maps ``(shape, dtype, generator)`` to a CPU
tensor ``shape`` (last dim a multiple of 32) of ``dtype``; move it to the device afterwards.

Families: random values at several magnitudes, random finite bit patterns, E2M1 tie points and
their neighbours times ``2**k``, block maxima exactly ``6 * 2**k`` and ``1.5 * 2**k``, zeros with
``-0``, subnormals next to the smallest normals (FTZ), the dtype's largest finite values, one
nonzero per block, and NaN / +-inf blocks (``fake_quantize`` only).
"""

from __future__ import annotations

import torch

from .format import CANONICAL_NAN_BITS, INT_VIEW_DTYPES

BLOCK = 32
# Tie points of E2M1 round-to-nearest-even, in units of the block scale.
TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0)
FINITE_FAMILIES = (
    "random_1e-3",
    "random_1",
    "random_1e3",
    "random_extreme",
    "random_bits",
    "ties",
    "amax_6x2k",
    "amax_1p5x2k",
    "zeros_negzero",
    "subnormal",
    "maxima",
    "one_nonzero",
)
NONFINITE_FAMILIES = ("nan_inf_blocks",)
ALL_FAMILIES = FINITE_FAMILIES + NONFINITE_FAMILIES



def bits_dtype(dtype: torch.dtype) -> torch.dtype:
    """Integer dtype of the same width (for bit-exact comparison)."""
    return INT_VIEW_DTYPES[dtype]


def canonical_nan_bits(dtype: torch.dtype) -> int:
    """The quiet-NaN pattern fake_quantize (reference and kernel) writes for a non-finite block."""
    return CANONICAL_NAN_BITS[dtype]


def _exp_range(dtype: torch.dtype) -> tuple[int, int]:
    """Exponents k such that 6 * 2**k and 0.25 * 2**k * (1 - ulp) stay finite/normal-ish."""
    return {torch.float16: (-20, 13), torch.bfloat16: (-120, 124), torch.float32: (-120, 124)}[dtype]


def _random_bits(shape, dtype, g) -> torch.Tensor:
    if dtype == torch.float32:
        bits = torch.randint(-(2**31), 2**31, shape, generator=g, dtype=torch.int64).to(torch.int32)
        exp_mask, mant_bits = 0x7F800000, 23
    else:
        bits = torch.randint(-(2**15), 2**15, shape, generator=g, dtype=torch.int32).to(torch.int16)
        exp_mask, mant_bits = (0x7F80 if dtype == torch.bfloat16 else 0x7C00), (7 if dtype == torch.bfloat16 else 10)
    nonfinite = (bits & exp_mask) == exp_mask
    bits = torch.where(nonfinite, bits ^ (1 << mant_bits), bits)  # clear the lowest exponent bit
    return bits.view(dtype)


def _per_block(shape, g, dtype, lo_k, hi_k) -> torch.Tensor:
    """float32 ``2**k`` per block with k uniform in [lo_k, hi_k], broadcast to ``shape``."""
    *lead, k = shape
    ks = torch.randint(lo_k, hi_k + 1, (*lead, k // BLOCK, 1), generator=g).to(torch.float32)
    return torch.exp2(ks).expand(*lead, k // BLOCK, BLOCK).reshape(shape)


def make(family: str, shape, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A CPU tensor of ``family`` (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    lo_k, hi_k = _exp_range(dtype)
    finfo = torch.finfo(dtype)
    if family.startswith("random_") and family not in ("random_extreme", "random_bits"):
        scale = float(family.split("_")[1])
        return (torch.randn(shape, generator=g) * scale).to(dtype)
    if family == "random_extreme":
        return (torch.randn(shape, generator=g) * _per_block(shape, g, dtype, lo_k, hi_k)).to(dtype)
    if family == "random_bits":
        return _random_bits(shape, dtype, g)
    if family == "ties":
        # Per block: amax 6 * 2**k pins the scale to 2**k; the rest are tie points, their
        # dtype neighbours (one ulp up/down) and random signs.
        scale = _per_block(shape, g, dtype, lo_k, hi_k - 1).to(dtype)
        ties = torch.tensor(TIES, dtype=dtype)
        idx = torch.randint(0, len(TIES), shape, generator=g)
        v = ties[idx]
        step = torch.randint(-1, 2, shape, generator=g)
        v = torch.where(step > 0, torch.nextafter(v, torch.full_like(v, 8.0)), v)
        v = torch.where(step < 0, torch.nextafter(v, torch.zeros_like(v)), v)
        sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).to(dtype)
        v = (v * sign * scale).reshape(*shape[:-1], shape[-1] // BLOCK, BLOCK)
        v[..., 0] = (6.0 * scale.reshape(v.shape)[..., 0]).to(dtype)
        return v.reshape(shape)
    if family in ("amax_6x2k", "amax_1p5x2k"):
        top = 6.0 if family == "amax_6x2k" else 1.5
        scale = _per_block(shape, g, dtype, lo_k, hi_k - 1)
        v = (torch.rand(shape, generator=g) * 2 - 1) * top * scale
        v = v.reshape(*shape[:-1], shape[-1] // BLOCK, BLOCK)
        pos = torch.randint(0, BLOCK, v.shape[:-1] + (1,), generator=g)
        amax = top * scale.reshape(v.shape)[..., :1]
        v.scatter_(-1, pos, torch.where(torch.rand(pos.shape, generator=g) < 0.5, -amax, amax))
        return v.reshape(shape).to(dtype)
    if family == "zeros_negzero":
        v = torch.zeros(shape).reshape(*shape[:-1], shape[-1] // BLOCK, BLOCK)
        kind = torch.randint(0, 3, v.shape[:-1] + (1,), generator=g)  # +0 block, -0 block, mixed
        neg = (kind == 1) | ((kind == 2) & (torch.rand(v.shape, generator=g) < 0.5))
        v = torch.where(neg, -0.0, 0.0)
        v[..., 1::4] = torch.where(kind == 2, torch.randn(v[..., 1::4].shape, generator=g), v[..., 1::4])
        return v.reshape(shape).to(dtype)
    if family == "subnormal":
        tiny = finfo.tiny  # smallest normal
        mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
        sub = torch.randint(1, 2**mant, shape, generator=g)
        sub_vals = sub.to(torch.float64) * (tiny * 2.0**-mant)
        near = (torch.rand(shape, generator=g, dtype=torch.float64) * 8) * tiny  # 0 .. 8 * min normal
        v = torch.where(torch.rand(shape, generator=g) < 0.5, sub_vals, near)
        v = torch.where(torch.rand(shape, generator=g) < 0.5, -v, v)
        return v.to(dtype)
    if family == "maxima":
        v = torch.randn(shape, generator=g) * finfo.max / 4
        pick = torch.rand(shape, generator=g)
        v = torch.where(pick < 0.2, finfo.max, torch.where(pick < 0.4, -finfo.max, v))
        return v.to(torch.float64).clamp(-finfo.max, finfo.max).to(dtype)
    if family == "one_nonzero":
        v = torch.zeros(shape).reshape(*shape[:-1], shape[-1] // BLOCK, BLOCK)
        pos = torch.randint(0, BLOCK, v.shape[:-1] + (1,), generator=g)
        val = torch.randn(pos.shape, generator=g) * _per_block(shape, g, dtype, lo_k, hi_k).reshape(v.shape)[..., :1]
        v.scatter_(-1, pos, val)
        return v.reshape(shape).to(dtype)
    if family == "nan_inf_blocks":
        v = torch.randn(shape, generator=g).reshape(*shape[:-1], shape[-1] // BLOCK, BLOCK)
        kind = torch.randint(0, 4, v.shape[:-1], generator=g)  # finite, NaN, +inf, -inf
        pos = torch.randint(0, BLOCK, v.shape[:-1], generator=g)
        special = torch.tensor([0.0, float("nan"), float("inf"), float("-inf")])[kind]
        v = v.clone()
        flat, fpos, fkind, fspecial = v.reshape(-1, BLOCK), pos.reshape(-1), kind.reshape(-1), special.reshape(-1)
        rows = torch.nonzero(fkind > 0).flatten()
        flat[rows, fpos[rows]] = fspecial[rows]
        return flat.reshape(shape).to(dtype)
    raise ValueError(f"unknown input family {family!r}; known: {', '.join(ALL_FAMILIES)}")


def compare_bits(out: torch.Tensor, ref: torch.Tensor) -> str | None:
    """``None`` when ``out`` equals ``ref`` bit for bit (integer views, NaN payloads included),
    else a description of the first mismatch."""
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return f"shape/dtype {tuple(out.shape)} {out.dtype} != reference {tuple(ref.shape)} {ref.dtype}"
    if out.dtype.is_floating_point:
        ob, rb = out.contiguous().view(bits_dtype(out.dtype)), ref.contiguous().view(bits_dtype(ref.dtype))
    else:
        ob, rb = out, ref
    diff = ob != rb
    if diff.any():
        i = tuple(int(j) for j in diff.nonzero()[0])
        return (
            f"{int(diff.sum())} bit mismatches; first at {i}: {out[i].item()!r} (bits {int(ob[i]) & 0xFFFFFFFF:#x}) "
            f"!= reference {ref[i].item()!r} (bits {int(rb[i]) & 0xFFFFFFFF:#x})"
        )
    return None