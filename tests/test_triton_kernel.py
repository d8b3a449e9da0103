"""The Triton MXFP4 kernel against the PyTorch reference, bit for bit (CPU: Triton interpreter).

tests/conftest.py sets TRITON_INTERPRET=1 when there is no CUDA, before Triton is imported, so
these run in CI on CPU tensors. Shapes are small (the interpreter is slow); tests/gpu repeats the
comparison at full size on the GPU.
"""

import pytest
import torch

from _helpers import require

require("triton", "the triton extra is not installed (pip install -e '.[triton]')")

from megatron_qat.kernels import triton_qdq  # noqa: E402
from megatron_qat.numerics.families import (  # noqa: E402
    ALL_FAMILIES,
    FINITE_FAMILIES,
    compare_bits,
    make,
)
from megatron_qat.numerics.format import CANONICAL_NAN_BITS  # noqa: E402
from megatron_qat.numerics.reference import fake_quantize_reference, quantize_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")


def _x(family, shape, dtype, seed=0):
    return make(family, shape, dtype, seed).to(DEVICE)


def _assert_fake_quant_matches(x, block_size=32):
    out = triton_qdq.fake_quantize(x, block_size)
    ref = fake_quantize_reference(x, block_size)
    assert out.is_contiguous()
    assert compare_bits(out, ref) is None, compare_bits(out, ref)


def _assert_quant_matches(x, block_size=32):
    codes, scales = triton_qdq.quantize(x, block_size)
    ref_codes, ref_scales = quantize_reference(x, block_size)
    assert compare_bits(codes, ref_codes) is None, compare_bits(codes, ref_codes)
    assert compare_bits(scales, ref_scales) is None, compare_bits(scales, ref_scales)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_fake_quantize_family_bit_exact(family, dtype):
    _assert_fake_quant_matches(_x(family, (8, 128), dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", FINITE_FAMILIES)
def test_quantize_codes_and_scales_bit_exact(family, dtype):
    _assert_quant_matches(_x(family, (4, 128), dtype, seed=1))


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
def test_nonfinite_blocks_are_all_canonical_nan_and_others_untouched(dtype):
    x = torch.randn(2, 96).to(dtype)
    x[0, 40] = float("nan")
    x[1, 70] = float("-inf")
    out = triton_qdq.fake_quantize(x.to(DEVICE)).cpu()
    bits = out.view(torch.int32 if dtype == torch.float32 else torch.int16).to(torch.int64)
    mask = (1 << (8 * out.element_size())) - 1
    assert bool(((bits[0, 32:64] & mask) == CANONICAL_NAN_BITS[dtype]).all())
    assert bool(((bits[1, 64:96] & mask) == CANONICAL_NAN_BITS[dtype]).all())
    finite = torch.ones_like(out, dtype=torch.bool)
    finite[0, 32:64] = False
    finite[1, 64:96] = False
    assert bool(torch.isfinite(out[finite]).all())


def test_negative_zero_gives_code_0x8_and_zero_scale():
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    x[0, :32] = -0.0
    x[0, 33] = -1e-40  # bf16 subnormal: flushed to a signed zero
    codes, scales = triton_qdq.quantize(x.to(DEVICE))
    assert codes.cpu()[0, :16].tolist() == [0x88] * 16
    assert scales.cpu().tolist() == [[0, 0]]
    assert (codes.cpu()[0, 16] >> 4).item() == 0x8  # element 33 is the high nibble of byte 16


def test_bf16_max_dequantizes_to_inf_like_the_reference():
    x = torch.full((1, 32), torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16)
    out = triton_qdq.fake_quantize(x.to(DEVICE)).cpu()
    assert bool(torch.isinf(out).all()) and bool((out > 0).all())
    _assert_fake_quant_matches(x.to(DEVICE))


@pytest.mark.parametrize("shape", [(4, 5, 64), (3, 5, 64), (2, 3, 2, 32), (96,), (1, 32)], ids=str)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_ranks_and_ragged_leading_dims(shape, dtype):
    x = _x("random_extreme", shape, dtype, seed=2)
    _assert_fake_quant_matches(x)
    _assert_quant_matches(x)
    assert triton_qdq.fake_quantize(x).shape == x.shape


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_non_contiguous_input(dtype):
    base = _x("random_bits", (8, 256), dtype, seed=3)
    for x in (base[:, ::2], base.t().contiguous().t()[:, :128], base[1::2, 64:192]):
        assert not x.is_contiguous()
        _assert_fake_quant_matches(x)
        _assert_quant_matches(x)


@pytest.mark.parametrize("block_size", [16, 64, 48, 2])
def test_other_block_sizes(block_size):
    x = _x("random_extreme", (4, 192), torch.bfloat16, seed=4)
    _assert_fake_quant_matches(x, block_size)
    _assert_quant_matches(x, block_size)


def test_multi_program_grid_and_tail():
    # more blocks than one program's tile, with a partial last tile
    x = _x("random_bits", (3, 96 * 32 + 32 * 5), torch.bfloat16, seed=5)
    _assert_fake_quant_matches(x)
    out = triton_qdq.fake_quantize(x, elems_per_program=256)
    assert compare_bits(out, fake_quantize_reference(x)) is None


@pytest.mark.parametrize("shape", [(0, 64), (4, 0), (0, 0), (2, 0, 64), (3, 2, 0)], ids=str)
def test_empty_tensors_agree_with_the_reference(shape):
    """Issue 8: quantize(torch.empty(4, 0)) crashed in the reference and worked here; both now give
    empty codes [..., K//2], scales [..., K//32] and an empty fake-quant tensor of x's shape."""
    x = torch.empty(shape, dtype=torch.bfloat16, device=DEVICE)
    k = shape[-1]
    out, ref = triton_qdq.fake_quantize(x), fake_quantize_reference(x)
    assert out.shape == ref.shape == shape and out.dtype == ref.dtype == x.dtype
    codes, scales = triton_qdq.quantize(x)
    ref_codes, ref_scales = quantize_reference(x)
    assert codes.shape == ref_codes.shape == (*shape[:-1], k // 2)
    assert scales.shape == ref_scales.shape == (*shape[:-1], k // 32)
    assert codes.dtype == scales.dtype == ref_codes.dtype == ref_scales.dtype == torch.uint8
    for (c, s), (rc, rs) in zip(triton_qdq.quantize_many([x, x]), [(ref_codes, ref_scales)] * 2):
        assert c.shape == rc.shape and s.shape == rs.shape
    assert [t.shape for t in triton_qdq.fake_quantize_many([x, x])] == [shape, shape]


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
def test_grouped_list_of_experts_one_launch(dtype):
    shapes = [(8, 64), (3, 64), (5, 128), (0, 64), (2, 32), (7, 96)]
    families = ["random_bits", "ties", "subnormal", "zeros_negzero", "maxima", "nan_inf_blocks"]
    xs = [_x(f, s, dtype, seed=i) for i, (f, s) in enumerate(zip(families, shapes))]
    outs = triton_qdq.fake_quantize_many(xs, elems_per_program=128)  # several programs per expert
    assert len(outs) == len(xs)
    for out, x in zip(outs, xs):
        assert out.shape == x.shape and out.dtype == x.dtype
        assert compare_bits(out, fake_quantize_reference(x)) is None, compare_bits(out, fake_quantize_reference(x))


def test_grouped_non_contiguous_members_and_quantize_many():
    base = _x("random_extreme", (6, 256), torch.bfloat16, seed=7)
    xs = [base[:, ::2], base[:3, :64].clone(), base[2:5, 128:]]
    for out, x in zip(triton_qdq.fake_quantize_many(xs), xs):
        assert compare_bits(out, fake_quantize_reference(x)) is None
    for (codes, scales), x in zip(triton_qdq.quantize_many(xs), xs):
        ref_codes, ref_scales = quantize_reference(x)
        assert compare_bits(codes, ref_codes) is None and compare_bits(scales, ref_scales) is None


def test_grouped_rejects_mixed_dtypes():
    xs = [torch.zeros(2, 32, dtype=torch.bfloat16, device=DEVICE), torch.zeros(2, 32, dtype=torch.float16, device=DEVICE)]
    with pytest.raises(ValueError, match=r"xs\[1\] is torch.float16.*one dtype"):
        triton_qdq.fake_quantize_many(xs)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="not a multiple of the MXFP4 block size 32"):
        triton_qdq.fake_quantize(torch.zeros(2, 48, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(TypeError, match="float64"):
        triton_qdq.fake_quantize(torch.zeros(2, 32, dtype=torch.float64, device=DEVICE))
    x = torch.zeros(2, 32, dtype=torch.bfloat16, device=DEVICE)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        triton_qdq.quantize(x)


def test_no_global_table_cache():
    """Issue 9: the 64-entry global LRU is gone; a plain call keeps nothing after it returns."""
    assert not any(isinstance(v, dict) and "CACHE" in k.upper() for k, v in vars(triton_qdq).items())
    assert not hasattr(triton_qdq, "_TABLE_CACHE")


def test_table_slot_keeps_one_entry_and_rebuilds_only_on_change():
    xs = [_x("random_1", (4, 64), torch.bfloat16, seed=s) for s in range(3)]
    slot = triton_qdq.GroupTableSlot()
    first = triton_qdq.fake_quantize_many(xs, tables=slot)
    table = slot.current
    again = triton_qdq.fake_quantize_many(xs, tables=slot)
    assert slot.builds == 1 and slot.current is table
    assert all(compare_bits(a, b) is None for a, b in zip(first, again))
    moved = [x.clone() for x in xs]  # new storages: new data_ptrs
    triton_qdq.fake_quantize_many(moved, tables=slot)
    assert slot.builds == 2 and slot.current is not table and slot.graph_tables == []
    grown = moved[:2] + [_x("random_1", (8, 64), torch.bfloat16)]  # a size changed
    for out, x in zip(triton_qdq.fake_quantize_many(grown, tables=slot), grown):
        assert compare_bits(out, fake_quantize_reference(x)) is None
    assert slot.builds == 3
