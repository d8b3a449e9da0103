"""megatron_qat.numerics.families, the one adversarial-input generator (issue 9, item 3): every
family in every dtype and rank, what each family promises, and the parity checker's built-in set."""

import pytest
import torch

from megatron_qat.numerics import families
from megatron_qat.numerics.format import INT_VIEW_DTYPES

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", families.ALL_FAMILIES)
def test_every_family_any_rank_is_deterministic(family, dtype):
    for shape in ((2, 64), (2, 3, 96), (32,)):
        x = families.make(family, shape, dtype, seed=3)
        assert x.shape == shape and x.dtype == dtype and x.is_contiguous()
        if family in families.FINITE_FAMILIES:
            assert bool(torch.isfinite(x).all())
        again = families.make(family, shape, dtype, seed=3)
        assert torch.equal(x.view(INT_VIEW_DTYPES[dtype]), again.view(INT_VIEW_DTYPES[dtype]))


def _block_amax(x):
    return x.float().abs().reshape(-1, 32).amax(-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_amax_families_hit_their_targets(dtype):
    for family, top in (("amax_6x2k", 6.0), ("amax_1p5x2k", 1.5), ("ties", 6.0)):
        m = _block_amax(families.make(family, (16, 64), dtype)) / top
        assert bool((torch.frexp(m).mantissa == 0.5).all()), family  # exactly top * 2**k
    amax = _block_amax(families.make("amax_6x2k_pm_ulp", (64, 64), dtype)).to(dtype)
    six = (6.0 * torch.exp2(torch.floor(torch.log2(amax.float() / 6.0) + 0.5))).to(dtype)
    ulps = amax.view(INT_VIEW_DTYPES[dtype]).long() - six.view(INT_VIEW_DTYPES[dtype]).long()
    assert set(ulps.tolist()) == set(range(-3, 4))  # every offset -3..+3 occurs


def test_special_families_contain_their_special_values():
    z = families.make("zeros_negzero", (8, 64), torch.bfloat16)
    assert bool(torch.signbit(z[z == 0]).any()) and bool((~torch.signbit(z[z == 0])).any())
    s = families.make("subnormal", (8, 64), torch.bfloat16).float().abs()
    assert bool(((s > 0) & (s < torch.finfo(torch.bfloat16).tiny)).any())
    m = families.make("maxima", (8, 64), torch.bfloat16)
    assert bool((m.abs() == torch.finfo(torch.bfloat16).max).any())
    n = families.make("nan_inf_blocks", (8, 64), torch.bfloat16)
    assert bool(torch.isnan(n).any()) and bool(torch.isposinf(n).any()) and bool(torch.isneginf(n).any())
    one = families.make("one_nonzero", (8, 64), torch.bfloat16)
    assert ((one.reshape(-1, 32) != 0).sum(-1) == 1).all()


def test_bad_requests_are_clear_errors():
    with pytest.raises(ValueError, match="unknown input family 'nope'; known: random_1e-3"):
        families.make("nope", (2, 32), torch.bfloat16)
    with pytest.raises(ValueError, match=r"shape \(2, 48\) must be \[..., K\] with K % 32 == 0"):
        families.make("ties", (2, 48), torch.bfloat16)
    with pytest.raises(ValueError, match="float64 is not one of bf16, fp16, fp32"):
        families.make("ties", (2, 32), torch.float64)


def test_synthetic_set_for_the_parity_checker():
    named = list(families.synthetic_tensors())
    names = [n for n, _ in named]
    assert len(names) == len(set(names)) == 2 * len(families.SYNTHETIC_CASES)
    assert names[0] == "synthetic/bf16/random_1e-3" and "synthetic/fp16/experts_3d" in names
    for name, t in named:
        assert t.dtype in families.SYNTHETIC_DTYPES and t.shape[-1] % 32 == 0 and bool(torch.isfinite(t).all())
    shapes = {n.split("/")[-1]: tuple(t.shape) for n, t in named}
    assert shapes["experts_3d"] == (4, 24, 256) and shapes["ties"] == families.SYNTHETIC_SHAPE
    assert sum(t.numel() for _, t in named) < 600_000  # the default parity run stays quick
