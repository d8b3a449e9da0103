"""Input families for MXFP4 tests (after FlashInfer's tests/utils/test_fp4_quantize.py idea:
the family is a test parameter). Each builder returns a float32 tensor ``[rows, K]`` whose values
are exactly representable in the target dtype (the caller casts)."""

from __future__ import annotations

import torch

TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
DTYPE_MAX = {torch.bfloat16: torch.finfo(torch.bfloat16).max, torch.float16: 65504.0, torch.float32: torch.finfo(torch.float32).max}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_scaled(rows: int, k: int, scale: float, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, k, generator=_gen(seed)) * scale


def _exp_range(dtype: torch.dtype) -> tuple[int, int]:
    """Power-of-two exponents that keep 6*2^e and 0.25*2^e normal in ``dtype``."""
    return (-12, 13) if dtype == torch.float16 else (-100, 100)


def _ulp_step(vals: torch.Tensor, dtype: torch.dtype, direction: int) -> torch.Tensor:
    """``vals`` (exact in ``dtype``) moved ``direction`` (+1/-1) units in the last place of ``dtype``,
    away from zero for +1."""
    int_dtype = torch.int32 if dtype == torch.float32 else torch.int16
    bits = vals.to(dtype).view(int_dtype)
    return (bits + direction).view(dtype).float()


def boundary(rows: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Every E2M1 tie point, and its neighbours one dtype-ulp away, times 2^e, in blocks whose amax
    is 6*2^e so the ties land exactly on the scaled grid."""
    g = _gen(seed)
    lo, hi = _exp_range(dtype)
    pts = torch.tensor(TIES + tuple(-t for t in TIES))
    blocks = pts[torch.randint(0, len(pts), (rows, k // 32, 32), generator=g)]
    nudge = torch.randint(-1, 2, blocks.shape, generator=g)
    blocks = torch.where(nudge > 0, _ulp_step(blocks, dtype, 1), torch.where(nudge < 0, _ulp_step(blocks, dtype, -1), blocks))
    blocks[..., 0] = torch.where(torch.rand(rows, k // 32, generator=g) < 0.5, 6.0, -6.0)
    exps = torch.randint(lo, hi, (rows, k // 32, 1), generator=g).float()
    return (blocks * torch.exp2(exps)).reshape(rows, k)


def amax_exact(rows: int, k: int, mult: float, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Blocks whose amax is exactly ``mult * 2^e`` (mult 6 or 1.5), the rest random below it."""
    g = _gen(seed)
    lo, hi = _exp_range(dtype)
    x = (torch.rand(rows, k, generator=g) * 2 - 1) * mult
    x = x.reshape(rows, k // 32, 32)
    x[..., 0] = mult * torch.where(torch.rand(rows, k // 32, generator=g) < 0.5, 1.0, -1.0)
    exps = torch.randint(lo, hi, (rows, k // 32, 1), generator=g).float()
    return (x * torch.exp2(exps)).reshape(rows, k)


def zeros_signed(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    sign = torch.where(torch.rand(rows, k, generator=g) < 0.5, -1.0, 1.0)
    return sign * 0.0


def subnormals(rows: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Subnormals of the dtype, some blocks mixed with one normal value of tiny exponent."""
    g = _gen(seed)
    tiny = torch.finfo(dtype).tiny  # smallest normal
    smallest = tiny * torch.finfo(dtype).eps
    x = (torch.rand(rows, k, generator=g) * 2 - 1) * tiny
    x = torch.where(x.abs() < smallest, torch.zeros_like(x), x).to(dtype).float()
    x = x.reshape(rows, k // 32, 32)
    x[::2, ::2, 5] = tiny * 6  # a normal amax: p = tiny -> byte 1 for bf16/fp32
    return x.reshape(rows, k).to(dtype).float()


def maxima(rows: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    m = DTYPE_MAX[dtype]
    x = (torch.rand(rows, k, generator=g) * 2 - 1).to(dtype).float() * m
    x = x.reshape(rows, k // 32, 32)
    x[..., 3] = m
    x[::2, :, 7] = -m
    return x.reshape(rows, k).to(dtype).float()


def one_nonzero(rows: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    lo, hi = _exp_range(dtype)
    x = torch.zeros(rows, k).reshape(rows, k // 32, 32)
    idx = torch.randint(0, 32, (rows, k // 32, 1), generator=g)
    vals = torch.randn(rows, k // 32, 1, generator=g) * torch.exp2(torch.randint(lo, hi, (rows, k // 32, 1), generator=g).float())
    x.scatter_(-1, idx, vals)
    return x.reshape(rows, k)


FAMILIES = (
    "random_1e-3",
    "random_0.02",
    "random_1",
    "random_1e3",
    "random_1e-30",
    "random_1e30",
    "boundary",
    "amax_6x2k",
    "amax_1.5x2k",
    "zeros",
    "subnormal",
    "maxima",
    "one_nonzero",
)


def make(family: str, dtype: torch.dtype, rows: int = 8, k: int = 128, seed: int = 0) -> torch.Tensor:
    """A ``[rows, k]`` tensor of ``dtype`` from the named family."""
    if family.startswith("random_"):
        scale = float(family.split("_", 1)[1])
        if dtype == torch.float16 and not (1e-4 <= scale <= 1e3):
            scale = 1e-4 if scale < 1 else 1e3  # keep fp16 in range (subnormal/max have their own families)
        x = random_scaled(rows, k, scale, seed)
    elif family == "boundary":
        x = boundary(rows, k, dtype, seed)
    elif family == "amax_6x2k":
        x = amax_exact(rows, k, 6.0, dtype, seed)
    elif family == "amax_1.5x2k":
        x = amax_exact(rows, k, 1.5, dtype, seed)
    elif family == "zeros":
        x = zeros_signed(rows, k, seed)
    elif family == "subnormal":
        x = subnormals(rows, k, dtype, seed)
    elif family == "maxima":
        x = maxima(rows, k, dtype, seed)
    elif family == "one_nonzero":
        x = one_nonzero(rows, k, dtype, seed)
    else:
        raise ValueError(f"unknown family {family!r}")
    return x.to(dtype)
