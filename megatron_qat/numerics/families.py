"""The one adversarial-input generator: families of tensors that drive every branch of the MXFP4
rule, and a bit-level comparison.

Every consumer draws from here: the numerics tests, the kernel tests (CPU interpreter and GPU), the
benchmark's correctness check and the parity checker's built-in run (:func:`synthetic_tensors`,
``megatron-qat parity --synthetic``). :func:`make` maps ``(family, shape, dtype, seed)`` to a CPU
tensor of ``shape`` (last dim a multiple of 32) and ``dtype`` (bf16, fp16 or fp32); move it to the
device afterwards. Deterministic for a given seed.

Families (where two MXFP4 implementations can disagree):

- ``random_1e-3`` / ``random_1`` / ``random_1e3``: normal values at that scale;
  ``random_extreme``: normal values times ``2**k`` per block, k over the dtype's whole range;
  ``random_bits``: random finite bit patterns (every exponent, subnormals, both zeros).
- ``ties``: amax ``6 * 2**k`` pins the scale to ``2**k``; the other elements are E2M1 tie points
  and grid points times ``2**k``, exactly or one dtype ulp up/down, random signs and positions.
- ``amax_6x2k`` / ``amax_1p5x2k``: block maxima exactly ``6 * 2**k`` / ``1.5 * 2**k`` (the scale
  ceiling at a power of two).
- ``amax_6x2k_pm_ulp``: block maxima ``6 * 2**k`` moved -3..+3 dtype ulps, so the float32 product
  ``amax * RN(1/6)`` falls just below, on or just above a power of two.
- ``zeros_negzero``: all +0, all -0 and mixed-sign-zero blocks.
- ``subnormal``: dtype subnormals and values near the float32 FTZ boundary, alone and in blocks
  with one normal element (FTZ of an element before scaling).
- ``maxima``: the dtype's largest finite values, a few ulps below them, and large random values.
- ``one_nonzero``: one nonzero per block.
- ``nan_inf_blocks``: blocks holding one NaN, +inf or -inf (``fake_quantize`` only).

For the other rules (:mod:`megatron_qat.numerics.rules`):

- ``amax_1p75x2k_pm_ulp``: block maxima ``1.75 * 2**k`` moved -3..+3 ulps (the EVEN rule rounds the
  amax up to the next power of two from a mantissa of 1.75 on).
- ``e4m3_ties``: amax ``448 * 2**k`` pins the MXFP8 scale to ``2**k``; the other elements are E4M3
  grid values and the midpoints between neighbours (subnormal ones included) times ``2**k``,
  exactly or one dtype ulp up/down.
- ``e4m3_top``: the same scale, elements in the top E4M3 binade ``[256, 448] * 2**k`` (step 32,
  ties at odd multiples of 16) next to the saturation at 448.
- ``e4m3_subnormal``: the same scale, elements ``[0, 2**-5] * 2**k``: E4M3 subnormals after
  scaling (multiples of 2**-9), their ties and values below 2**-10 that round to a signed zero.
- ``amax_448x2k_pm_ulp``: block maxima ``448 * 2**k`` moved -3..+3 ulps (``amax / 448`` just
  below, on or above a power of two).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from .constants import DEFAULT_BLOCK_SIZE as BLOCK
from .format import INT_VIEW_DTYPES

# Tie points of E2M1 round-to-nearest-even and the grid values, in units of the block scale.
TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0)
GRID = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
FINITE_FAMILIES = (
    "random_1e-3",
    "random_1",
    "random_1e3",
    "random_extreme",
    "random_bits",
    "ties",
    "amax_6x2k",
    "amax_1p5x2k",
    "amax_6x2k_pm_ulp",
    "zeros_negzero",
    "subnormal",
    "maxima",
    "one_nonzero",
    "amax_1p75x2k_pm_ulp",
    "e4m3_ties",
    "e4m3_top",
    "e4m3_subnormal",
    "amax_448x2k_pm_ulp",
)
NONFINITE_FAMILIES = ("nan_inf_blocks",)
ALL_FAMILIES = FINITE_FAMILIES + NONFINITE_FAMILIES

# The parity checker's built-in run: every finite family in the dtypes FlashInfer takes, one
# [64, 256] tensor each, plus a fused-experts-shaped [4, 24, 256] one (~0.4M elements in all).
SYNTHETIC_DTYPES = (torch.bfloat16, torch.float16)
SYNTHETIC_SHAPE = (64, 256)
SYNTHETIC_EXPERTS = ("experts_3d", "random_extreme", (4, 24, 256))
SYNTHETIC_FAMILIES = FINITE_FAMILIES[:13]  # the MXFP4 weight families (the E4M3 ones came later)
SYNTHETIC_CASES = SYNTHETIC_FAMILIES + (SYNTHETIC_EXPERTS[0],)
_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def _exp_range(dtype: torch.dtype, top: float = 6.0) -> tuple[int, int]:
    """Exponents k for which ``top * 2**k`` stays finite in ``dtype`` (for fp16, 0.25 * 2**k reaches
    into its subnormals, which are normal float32 numbers and must not be flushed); for the E4M3
    families (``top`` 448) the smallest E4M3 tie 2**-10 * 2**k stays representable in fp16."""
    if top == 448.0:
        return {torch.float16: (-14, 7), torch.bfloat16: (-110, 110), torch.float32: (-110, 110)}[dtype]
    return {torch.float16: (-20, 13), torch.bfloat16: (-120, 124), torch.float32: (-120, 124)}[dtype]


def _ulps(x: torch.Tensor, steps) -> torch.Tensor:
    """Positive finite ``x`` moved by ``steps`` units in the last place of its own dtype."""
    ints = x.contiguous().view(INT_VIEW_DTYPES[x.dtype])
    return (ints + torch.as_tensor(steps).to(ints.dtype)).view(x.dtype)


def _blocks(shape) -> tuple[int, ...]:
    """``[..., K]`` -> ``[..., K // BLOCK, BLOCK]``."""
    return (*shape[:-1], shape[-1] // BLOCK, BLOCK)


def _per_block(shape, g, lo_k: int, hi_k: int) -> torch.Tensor:
    """float32 ``2**k`` per block with k uniform in [lo_k, hi_k], broadcast to ``shape``."""
    bshape = _blocks(shape)
    ks = torch.randint(lo_k, hi_k + 1, (*bshape[:-1], 1), generator=g).to(torch.float32)
    return torch.exp2(ks).expand(bshape).reshape(shape)


def _signs(shape, g) -> torch.Tensor:
    return torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)


def _put_one_per_block(v: torch.Tensor, values: torch.Tensor, g) -> torch.Tensor:
    """float32 ``v [..., K]`` with one random position per block set to ``values [..., K//32, 1]``."""
    b = v.reshape(_blocks(v.shape)).clone()
    pos = torch.randint(0, BLOCK, (*b.shape[:-1], 1), generator=g)
    b.scatter_(-1, pos, values)
    return b.reshape(v.shape)


def _random(scale: float):
    return lambda shape, dtype, g: (torch.randn(shape, generator=g) * scale).to(dtype)


def _random_extreme(shape, dtype, g):
    lo, hi = _exp_range(dtype)
    return (torch.randn(shape, generator=g) * _per_block(shape, g, lo, hi)).to(dtype)


def _random_bits(shape, dtype, g):
    mant = _MANTISSA_BITS[dtype]
    width = 32 if dtype == torch.float32 else 16
    bits = torch.randint(-(2 ** (width - 1)), 2 ** (width - 1), shape, generator=g, dtype=torch.int64)
    bits = bits.to(INT_VIEW_DTYPES[dtype])
    exp_mask = ((1 << (width - 1 - mant)) - 1) << mant
    nonfinite = (bits & exp_mask) == exp_mask
    return torch.where(nonfinite, bits ^ (1 << mant), bits).view(dtype)  # clear the lowest exponent bit


def _ties(shape, dtype, g):
    lo, hi = _exp_range(dtype)
    scale = _per_block(shape, g, lo, hi - 1).to(dtype)
    pool = torch.tensor(TIES + GRID, dtype=dtype)
    v = pool[torch.randint(0, len(pool), shape, generator=g)]
    v = _ulps(v, torch.randint(-1, 2, shape, generator=g))  # exactly, one ulp up or one ulp down
    v = v.clamp(max=6.0)  # 6 + 1 ulp would lift the block amax (and the scale) past 6 * 2**k
    v = (v * _signs(shape, g).to(dtype) * scale).float()
    six = (6.0 * scale.float()).reshape(_blocks(shape))[..., :1]
    return _put_one_per_block(v, six, g).to(dtype)  # amax 6 * 2**k pins the scale


def _amax_at(top: float):
    def build(shape, dtype, g):
        lo, hi = _exp_range(dtype)
        scale = _per_block(shape, g, lo, hi - 1)
        v = (torch.rand(shape, generator=g) * 2 - 1) * top * scale
        amax = (top * scale).reshape(_blocks(shape))[..., :1]
        amax = amax * _signs(amax.shape, g)
        return _put_one_per_block(v, amax, g).to(dtype)

    return build


def _amax_pm_ulp(top: float):
    def build(shape, dtype, g):
        lo, hi = _exp_range(dtype, top)
        scale = _per_block(shape, g, lo, hi - 1)
        bshape = _blocks(shape)
        amax = (top * scale).reshape(bshape)[..., :1].to(dtype)
        amax = _ulps(amax, torch.randint(-3, 4, amax.shape, generator=g)).float()
        v = (torch.rand(shape, generator=g) * 2 - 1) * amax.expand(bshape).reshape(shape) * 0.99
        return _put_one_per_block(v, amax, g).to(dtype)

    return build


def _e4m3_grid_and_ties() -> torch.Tensor:
    """float64 E4M3 magnitudes (all 127 finite ones, from the byte layout) and the midpoints."""
    b = torch.arange(127, dtype=torch.float64)
    e, m = torch.div(b, 8, rounding_mode="floor"), b % 8
    grid = torch.where(e == 0, m * 2.0**-9, (1 + m / 8) * torch.exp2(e - 7))
    return torch.cat([grid, (grid[1:] + grid[:-1]) / 2])


def _e4m3_pinned(pool_fn):
    """amax 448 * 2**k pins the MXFP8 scale to 2**k; the other elements come from ``pool_fn``
    (float64 magnitudes in units of the scale), exactly or one dtype ulp up/down, random signs."""

    def build(shape, dtype, g):
        lo, hi = _exp_range(dtype, 448.0)
        scale = _per_block(shape, g, lo, hi).to(dtype)
        pool = pool_fn(g).to(dtype)
        v = pool[torch.randint(0, len(pool), shape, generator=g)]
        nonzero = v != 0
        v = torch.where(nonzero, _ulps(v.abs(), torch.randint(-1, 2, shape, generator=g)), v)
        v = v.clamp(max=448.0)  # 448 + 1 ulp would lift the amax past 448 * 2**k
        v = (v * _signs(shape, g).to(dtype) * scale).float()
        top = (448.0 * scale.float()).reshape(_blocks(shape))[..., :1]
        return _put_one_per_block(v, top, g).to(dtype)

    return build


def _zeros_negzero(shape, dtype, g):
    b = torch.zeros(_blocks(shape))
    kind = torch.randint(0, 3, (*b.shape[:-1], 1), generator=g)  # +0 block, -0 block, mixed
    neg = (kind == 1) | ((kind == 2) & (torch.rand(b.shape, generator=g) < 0.5))
    b = torch.where(neg, -0.0, 0.0)
    b[..., 1::4] = torch.where(kind == 2, torch.randn(b[..., 1::4].shape, generator=g), b[..., 1::4])
    return b.reshape(shape).to(dtype)


def _subnormal(shape, dtype, g):
    tiny = torch.finfo(dtype).tiny  # smallest normal
    mant = _MANTISSA_BITS[dtype]
    sub = torch.randint(1, 2**mant, shape, generator=g).to(torch.float64) * (tiny * 2.0**-mant)
    near = torch.rand(shape, generator=g, dtype=torch.float64) * 8 * tiny  # 0 .. 8 * min normal
    v = torch.where(torch.rand(shape, generator=g) < 0.5, sub, near)
    v = v * _signs(shape, g).double()
    # a third of the blocks get one normal element: 1.0, the float32 FTZ edge 6 * 2**-126 or random
    edge = torch.tensor([1.0, 6.0 * 2.0**-126, 2.0**-120], dtype=torch.float64)
    normal = edge[torch.randint(0, 3, (*_blocks(shape)[:-1], 1), generator=g)]
    with_normal = torch.rand(normal.shape, generator=g) < 1 / 3
    b = v.reshape(_blocks(shape)).clone()
    b[..., :1] = torch.where(with_normal, normal, b[..., :1])
    return b.reshape(shape).to(dtype)


def _maxima(shape, dtype, g):
    top = torch.tensor([torch.finfo(dtype).max], dtype=dtype)
    below = _ulps(top.expand(shape).contiguous(), -torch.randint(0, 8, shape, generator=g)).float()
    rand = (torch.randn(shape, generator=g) * float(top) / 4).to(torch.float64).clamp(-float(top), float(top)).float()
    pick = torch.rand(shape, generator=g)
    v = torch.where(pick < 0.4, below * _signs(shape, g), rand)
    return v.to(dtype)


def _one_nonzero(shape, dtype, g):
    lo, hi = _exp_range(dtype)
    scale = _per_block(shape, g, lo, hi).reshape(_blocks(shape))[..., :1]
    val = torch.randn(scale.shape, generator=g) * scale
    return _put_one_per_block(torch.zeros(shape), val, g).to(dtype)


def _nan_inf_blocks(shape, dtype, g):
    v = torch.randn(shape, generator=g)
    kind = torch.randint(0, 4, (*_blocks(shape)[:-1], 1), generator=g)  # finite, NaN, +inf, -inf
    special = torch.tensor([0.0, float("nan"), float("inf"), float("-inf")])[kind]
    b = v.reshape(_blocks(shape))
    pos = torch.randint(0, BLOCK, kind.shape, generator=g)
    put = torch.zeros(b.shape, dtype=torch.bool).scatter_(-1, pos, kind > 0)
    return torch.where(put, special, b).reshape(shape).to(dtype)


_BUILDERS: dict[str, Callable[[tuple, torch.dtype, torch.Generator], torch.Tensor]] = {
    "random_1e-3": _random(1e-3),
    "random_1": _random(1.0),
    "random_1e3": _random(1e3),
    "random_extreme": _random_extreme,
    "random_bits": _random_bits,
    "ties": _ties,
    "amax_6x2k": _amax_at(6.0),
    "amax_1p5x2k": _amax_at(1.5),
    "amax_6x2k_pm_ulp": _amax_pm_ulp(6.0),
    "zeros_negzero": _zeros_negzero,
    "subnormal": _subnormal,
    "maxima": _maxima,
    "one_nonzero": _one_nonzero,
    "amax_1p75x2k_pm_ulp": _amax_pm_ulp(1.75),
    "e4m3_ties": _e4m3_pinned(lambda g: _e4m3_grid_and_ties()),
    "e4m3_top": _e4m3_pinned(lambda g: 256.0 + 192.0 * torch.rand(512, generator=g, dtype=torch.float64)),
    "e4m3_subnormal": _e4m3_pinned(
        lambda g: torch.cat([torch.arange(0, 18, dtype=torch.float64) * 2.0**-10, torch.rand(64, generator=g, dtype=torch.float64) * 2.0**-5])
    ),
    "amax_448x2k_pm_ulp": _amax_pm_ulp(448.0),
    "nan_inf_blocks": _nan_inf_blocks,
}
assert tuple(_BUILDERS) == ALL_FAMILIES


def make(family: str, shape, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A CPU tensor of ``family`` (see the module docstring), ``shape`` ``[..., K]`` with
    ``K % 32 == 0``, ``dtype`` bf16 / fp16 / fp32."""
    build = _BUILDERS.get(family)
    if build is None:
        raise ValueError(f"unknown input family {family!r}; known: {', '.join(ALL_FAMILIES)}")
    shape = tuple(shape)
    if not shape or shape[-1] % BLOCK:
        raise ValueError(f"family {family}: shape {shape} must be [..., K] with K % {BLOCK} == 0")
    if dtype not in _MANTISSA_BITS:
        raise ValueError(f"family {family}: dtype {dtype} is not one of bf16, fp16, fp32")
    return build(shape, dtype, torch.Generator().manual_seed(seed)).contiguous()


def synthetic_tensors(seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """The parity checker's built-in tensors: ``(name, tensor)`` for every case of
    ``SYNTHETIC_CASES`` in bf16 then fp16, named ``synthetic/<bf16|fp16>/<case>``. All finite."""
    expert_case, expert_family, expert_shape = SYNTHETIC_EXPERTS
    for dtype in SYNTHETIC_DTYPES:
        for i, case in enumerate(SYNTHETIC_CASES):
            if case == expert_case:
                t = make(expert_family, expert_shape, dtype, seed + i)
            else:
                t = make(case, SYNTHETIC_SHAPE, dtype, seed + i)
            if not bool(torch.isfinite(t).all()):
                raise AssertionError(f"synthetic case {case} ({dtype}) built a non-finite value")
            yield f"synthetic/{_SHORT[dtype]}/{case}", t


def compare_bits(out: torch.Tensor, ref: torch.Tensor) -> str | None:
    """``None`` when ``out`` equals ``ref`` bit for bit (integer views, NaN payloads included),
    else a description of the first mismatch."""
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return f"shape/dtype {tuple(out.shape)} {out.dtype} != reference {tuple(ref.shape)} {ref.dtype}"
    if out.dtype.is_floating_point:
        ob = out.contiguous().view(INT_VIEW_DTYPES[out.dtype])
        rb = ref.contiguous().view(INT_VIEW_DTYPES[ref.dtype])
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
