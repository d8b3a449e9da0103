"""Built-in adversarial tensors for ``megatron-qat parity --synthetic`` (the default run).

Every family exists in bfloat16 and float16; each is a small tensor ``[R, K]`` (one ``[E, N, K]``)
named ``synthetic/<dtype>/<family>``. They target the places where two MXFP4 implementations
can disagree: E2M1 rounding ties, the E8M0 ceiling at exact powers of two, the RN(1/6) product
one ulp either side of a power of two, flush-to-zero of subnormals, signed zeros, the dtype's
largest finite values and sparse blocks. Deterministic (fixed seed), ~0.4M elements in all.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

K = 256  # 8 blocks of 32 per row
# E2M1 midpoints (RNE ties) and the representable magnitudes themselves.
TIE_POINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
CODE_POINTS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
DTYPES = (torch.bfloat16, torch.float16)
_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def _exponents(dtype: torch.dtype) -> list[int]:
    """Powers of two k for which 6 * 2**k (and the tie points times 2**k) stay normal in dtype."""
    if dtype == torch.float16:
        return list(range(-12, 14))  # 0.25 * 2**-12 = 2**-14 (smallest fp16 normal); 6 * 2**13 < 65504
    return list(range(-120, 125, 7)) + [-124, -123, 124, 125]  # 6 * 2**125 < bf16 max


def _neighbours(x: torch.Tensor, steps: int) -> torch.Tensor:
    """``x`` moved by ``steps`` units in the last place of its own dtype (positive finite x)."""
    return (x.view(torch.int16) + steps).view(x.dtype)


def _blocks_to_rows(blocks: torch.Tensor) -> torch.Tensor:
    """``[n, 32]`` -> ``[ceil(n / 8), K]`` padding with zero blocks."""
    per_row = K // 32
    pad = (-blocks.shape[0]) % per_row
    if pad:
        blocks = torch.cat([blocks, torch.zeros(pad, 32, dtype=blocks.dtype)])
    return blocks.reshape(-1, K)


def random_magnitudes(dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    scales = (1e-4, 1e-2, 1.0, 1e2, 1e3) if dtype == torch.float16 else (1e-30, 1e-6, 1.0, 1e6, 1e30)
    return torch.cat([(torch.randn(64, K, generator=g) * s).to(dtype) for s in scales])


def tie_points(dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Block = [6, every tie point and code point, their negatives, ...] * 2**k: amax 6 * 2**k
    makes the scale exactly 2**k, so each element lands exactly on a tie or a code point."""
    values = [6.0] + [t for t in TIE_POINTS] + [-t for t in TIE_POINTS] + list(CODE_POINTS[1:]) + [-c for c in CODE_POINTS[1:]]
    values = (values + [0.0] * 32)[:32]
    base = torch.tensor(values, dtype=torch.float64)
    rows = [base * 2.0**k for k in _exponents(dtype)]
    blocks = torch.stack(rows).to(dtype)
    # and the same blocks shuffled, so ties sit at every position (and in the high nibble)
    perm = torch.stack([torch.randperm(32, generator=g) for _ in range(blocks.shape[0])])
    return _blocks_to_rows(torch.cat([blocks, torch.gather(blocks, 1, perm)]))


def tie_neighbours(dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Tie points moved one ulp (in dtype) up and down, with amax 6 * 2**k."""
    out = []
    for k in _exponents(dtype):
        ties = torch.tensor(TIE_POINTS, dtype=torch.float64).mul(2.0**k).to(dtype)
        up, down = _neighbours(ties, 1), _neighbours(ties, -1)
        block = torch.cat([torch.tensor([6.0 * 2.0**k], dtype=torch.float64).to(dtype), up, down, -up, -down])
        out.append(torch.cat([block, torch.zeros(32 - block.numel(), dtype=dtype)]))
    return _blocks_to_rows(torch.stack(out))


def amax_powers(dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Blocks whose amax is exactly 6 * 2**k or 1.5 * 2**k (others uniform below it)."""
    out = []
    for k in _exponents(dtype):
        for top in (6.0, 1.5):
            amax = top * 2.0**k
            block = (torch.rand(32, generator=g, dtype=torch.float64) * 2 - 1) * amax
            block[int(torch.randint(32, (1,), generator=g))] = amax if k % 2 else -amax
            out.append(block.to(dtype))
    return _blocks_to_rows(torch.stack(out))


def amax_rcp_six_ulp(dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """amax / 6 = 2**k * (1 +- a few ulp): amax = 6 * 2**k moved -3..+3 ulps in dtype, so the
    fp32 product amax * RN(1/6) falls just below, on, or just above a power of two."""
    out = []
    for k in _exponents(dtype):
        six = torch.tensor([6.0 * 2.0**k], dtype=torch.float64).to(dtype)
        for step in (-3, -2, -1, 0, 1, 2, 3):
            amax = _neighbours(six, step).double().item()
            block = (torch.rand(32, generator=g, dtype=torch.float64) * 2 - 1) * amax
            block[int(torch.randint(32, (1,), generator=g))] = amax
            out.append(block.to(dtype))
    return _blocks_to_rows(torch.stack(out))


def zeros_and_signed_zeros(dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """All +0 blocks, all -0 blocks, alternating +0/-0, and -0 mixed with normal values."""
    plus = torch.zeros(32, dtype=dtype)
    minus = -plus
    alternating = torch.where(torch.arange(32) % 2 == 0, plus, minus)
    mixed = torch.randn(32, generator=g).to(dtype)
    mixed[::3] = minus[::3]
    return _blocks_to_rows(torch.stack([plus, minus, alternating, mixed] * 4))


def subnormals(dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """dtype subnormals: blocks made only of them (amax subnormal), mixed with a normal amax,
    and fp32-subnormal/normal boundary values (for bf16, 2**-126 and its neighbours)."""
    info = torch.finfo(dtype)
    smallest_bits = torch.arange(1, 33, dtype=torch.int16)
    tiny = smallest_bits.view(dtype)  # the 32 smallest positive subnormals
    largest_sub = _neighbours(torch.tensor([info.tiny], dtype=dtype), -1)
    blocks = [tiny, -tiny, tiny.flip(0), torch.cat([tiny[:31], torch.tensor([info.tiny], dtype=dtype)])]
    mixed = tiny.clone()
    mixed[5] = torch.tensor(1.0, dtype=dtype)
    blocks.append(mixed)
    edge = torch.cat([largest_sub, torch.tensor([info.tiny], dtype=dtype), _neighbours(torch.tensor([info.tiny], dtype=dtype), 1)])
    edge_block = torch.cat([edge, -edge, torch.full((26,), info.tiny, dtype=dtype) * 3])
    blocks.append(edge_block)
    magnitude_bits = torch.randint(0, 64, (8, 32), generator=g, dtype=torch.int16)
    negative = torch.randint(0, 2, (8, 32), generator=g, dtype=torch.int16).bool()
    bits = torch.where(negative, magnitude_bits - 0x8000, magnitude_bits)  # sign bit | tiny magnitude
    blocks.extend(list(bits.view(dtype)))  # random subnormal bit patterns, both signs
    return _blocks_to_rows(torch.stack(blocks))


def dtype_maxima(dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """The dtype's largest finite values: blocks of +-max, max with random smaller values, and
    the few values just below max."""
    top = torch.tensor([torch.finfo(dtype).max], dtype=dtype)
    below = torch.cat([_neighbours(top, -s) for s in range(1, 9)])
    blocks = [top.repeat(32), -top.repeat(32), torch.cat([below, -below, below, -below])]
    for _ in range(5):
        b = (torch.rand(32, generator=g, dtype=torch.float64) * 2 - 1) * float(top)
        b[int(torch.randint(32, (1,), generator=g))] = float(top)
        blocks.append(b.to(dtype))
    return _blocks_to_rows(torch.stack(blocks))


def one_nonzero_per_block(dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Zero blocks with a single nonzero (random position, sign and magnitude) each."""
    n = 512
    blocks = torch.zeros(n, 32, dtype=torch.float64)
    pos = torch.randint(32, (n,), generator=g)
    lo, hi = (-14, 15) if dtype == torch.float16 else (-126, 127)
    mags = torch.randn(n, generator=g, dtype=torch.float64) * 2.0 ** torch.randint(lo, hi, (n,), generator=g).double()
    blocks[torch.arange(n), pos] = mags
    return _blocks_to_rows(blocks.to(dtype))


def experts_3d(dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """A fused-experts-shaped tensor ``[E=4, N=24, K]`` (rows of K compared per expert)."""
    return (torch.randn(4, 24, K, generator=g) * 0.02).to(dtype)


FAMILIES: dict[str, Callable[[torch.dtype, torch.Generator], torch.Tensor]] = {
    "random_magnitudes": random_magnitudes,
    "tie_points_x_2^k": tie_points,
    "tie_points_pm_1ulp": tie_neighbours,
    "amax_6x2^k_and_1.5x2^k": amax_powers,
    "amax_over_6_2^k_pm_ulp": amax_rcp_six_ulp,
    "zeros_and_neg_zero": zeros_and_signed_zeros,
    "subnormals": subnormals,
    "dtype_maxima": dtype_maxima,
    "one_nonzero_per_block": one_nonzero_per_block,
    "experts_3d": experts_3d,
}


def synthetic_tensors(seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every family in bf16 then fp16 (all finite, K % 32 == 0)."""
    for dtype in DTYPES:
        for family, build in FAMILIES.items():
            g = torch.Generator().manual_seed(seed)
            t = build(dtype, g)
            if not bool(torch.isfinite(t).all()):
                raise AssertionError(f"synthetic family {family} ({dtype}) built a non-finite value")
            yield f"synthetic/{_SHORT[dtype]}/{family}", t.contiguous()
