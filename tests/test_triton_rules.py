"""Issue 15, item 4: the Triton kernel of every rule against the PyTorch reference, bit for bit on
integer views, on every input family and dtype (CPU: Triton interpreter, small shapes; tests/gpu
repeats it at full size). FLASHINFER_MXFP4 is tests/test_triton_kernel.py's subject."""

import pytest
import torch

from _helpers import require  # noqa: E402

require("triton", "the triton extra is not installed (pip install -e '.[triton]')")

from megatron_qat.kernels import triton_qdq  # noqa: E402
from megatron_qat.numerics.families import ALL_FAMILIES, FINITE_FAMILIES, compare_bits, make  # noqa: E402
from megatron_qat.numerics.reference import fake_quantize_reference, quantize_reference  # noqa: E402
from megatron_qat.numerics.rules import FLASHINFER_MXFP8, RULES, VLLM_ONLINE_MXFP4  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
OTHER_RULES = tuple(r for r in RULES.values() if r.name != "flashinfer-mxfp4")
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("rule", OTHER_RULES, ids=str)
def test_fake_quantize_every_rule_family_dtype(rule, family, dtype):
    x = make(family, (4, 128), dtype, seed=7).to(DEVICE)
    out, ref = triton_qdq.fake_quantize(x, rule=rule), fake_quantize_reference(x, rule=rule)
    assert compare_bits(out, ref) is None, compare_bits(out, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", FINITE_FAMILIES)
@pytest.mark.parametrize("rule", OTHER_RULES, ids=str)
def test_quantize_every_rule_family_dtype(rule, family, dtype):
    x = make(family, (2, 128), dtype, seed=8).to(DEVICE)
    (codes, scales), (ref_codes, ref_scales) = triton_qdq.quantize(x, rule=rule), quantize_reference(x, rule=rule)
    assert compare_bits(scales, ref_scales) is None, compare_bits(scales, ref_scales)
    assert compare_bits(codes, ref_codes) is None, compare_bits(codes, ref_codes)


@pytest.mark.parametrize("rule", OTHER_RULES, ids=str)
def test_grouped_and_odd_block_sizes_every_rule(rule):
    xs = [make(f, s, torch.bfloat16, seed=i).to(DEVICE) for i, (f, s) in
          enumerate([("e4m3_ties", (3, 64)), ("subnormal", (2, 96)), ("nan_inf_blocks", (2, 32)), ("maxima", (0, 64))])]  # fmt: skip
    for out, x in zip(triton_qdq.fake_quantize_many(xs, rule=rule, elems_per_program=64), xs):
        assert compare_bits(out, fake_quantize_reference(x, rule=rule)) is None
    finite = [xs[0], xs[1]]
    for (c, s), x in zip(triton_qdq.quantize_many(finite, rule=rule), finite):
        rc, rs = quantize_reference(x, rule=rule)
        assert compare_bits(c, rc) is None and compare_bits(s, rs) is None
    x = make("random_extreme", (2, 96), torch.float32, seed=3).to(DEVICE)
    for bs in (16, 48):
        assert compare_bits(triton_qdq.fake_quantize(x, bs, rule=rule), fake_quantize_reference(x, bs, rule=rule)) is None


def test_mxfp8_codes_are_one_byte_per_element_and_vllm_keeps_subnormal_blocks():
    x = make("e4m3_subnormal", (2, 64), torch.bfloat16).to(DEVICE)
    codes, scales = triton_qdq.quantize(x, rule=FLASHINFER_MXFP8)
    assert codes.shape == (2, 64) and scales.shape == (2, 2)
    y = torch.zeros(1, 32, dtype=torch.bfloat16)
    y.view(torch.int16)[0, 0] = 0x0040  # 2**-127: FlashInfer flushes it, vLLM scales it by 2**127
    assert triton_qdq.fake_quantize(y.to(DEVICE), rule=VLLM_ONLINE_MXFP4).cpu().view(torch.int16)[0, 0] == 0x0040


def _every_bf16_magnitude_blocks(block_max: float) -> torch.Tensor:
    """Every bf16 bit pattern with |x| <= block_max (others 0), 31 per block, plus ``block_max``:
    each element meets every decision point of the grid under that block's scale."""
    v = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    v = torch.where(v.abs() <= block_max, v, torch.zeros((), dtype=torch.bfloat16))  # NaN -> 0 too
    v = v[: (v.numel() // 31) * 31].view(-1, 31)
    return torch.cat([v, torch.full((v.shape[0], 1), block_max, dtype=torch.bfloat16)], 1).reshape(-1, 64)


BLOCK_MAXIMA = (6.0, 5.0, 4.0, 7.0, 1.0, 0.75, 1e-38, 3.0e38)


@pytest.mark.parametrize("block_max", BLOCK_MAXIMA)
@pytest.mark.parametrize("rule", OTHER_RULES, ids=str)
def test_every_bf16_magnitude_every_rule(rule, block_max):
    """Exhaustive over bf16: every magnitude, both signs, under eight block maxima (the ties-down
    rounding moved to ``ceil(a / step - 0.5) * step``)."""
    x = _every_bf16_magnitude_blocks(block_max).to(DEVICE)
    out, ref = triton_qdq.fake_quantize(x, rule=rule), fake_quantize_reference(x, rule=rule)
    assert compare_bits(out, ref) is None, compare_bits(out, ref)


@pytest.mark.parametrize("scale", (1.0, 2.0**-20, 2.0**40, 0.75))
@pytest.mark.parametrize("rule", OTHER_RULES, ids=str)
def test_fp32_within_two_ulp_of_every_decision_point_every_rule(rule, scale):
    """fp32 elements at, and 1-2 ulp either side of, every E2M1 grid point and midpoint (after the
    block's scale), in blocks whose max is 6 * scale."""
    points = torch.tensor([0.0, 0.0625, 0.125, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0])
    near = torch.cat([points.view(torch.int32) + d for d in (-2, -1, 0, 1, 2)]).view(torch.float32)
    near = near[(near >= 0) & (near <= 6.0)]
    g = torch.Generator().manual_seed(0)
    vals = torch.cat([near, torch.rand(4096, generator=g) * 6])
    v = vals[: (vals.numel() // 31) * 31].view(-1, 31)
    v = v * torch.where(torch.rand(v.shape, generator=g) < 0.5, -1.0, 1.0)
    x = (torch.cat([v, torch.full((v.shape[0], 1), 6.0)], 1) * scale).to(DEVICE)
    out, ref = triton_qdq.fake_quantize(x, rule=rule), fake_quantize_reference(x, rule=rule)
    assert compare_bits(out, ref) is None, compare_bits(out, ref)
