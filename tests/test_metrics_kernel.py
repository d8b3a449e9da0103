"""The Triton statistics kernel (megatron_qat.kernels.stats_jit / triton_stats): the per-element
values it uses equal the numerics reference bit for bit, its tie test is the decision-point
definition, and its launch (grid, tiles, pointer table) changes no integer result.

CPU: Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), small shapes; on a GPU the
same tests run on CUDA. tests/test_metrics_values.py checks the statistics themselves against a
float64 oracle and against the torch pass; tests/gpu/test_metrics_kernel_gpu.py adds full-size
shapes, determinism, no-sync and CUDA-graph capture.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if os.environ.get("CI") == "true":  # .ci/run installs the triton extra: a missing one fails
    importlib.import_module("triton")
from _helpers import require  # noqa: E402

triton = require("triton", "the triton extra is not installed (pip install -e '.[triton]')")
tl = triton.language

from megatron_qat.kernels import triton_stats  # noqa: E402
from megatron_qat.kernels.triton_qdq import rule_constexprs  # noqa: E402
from megatron_qat.kernels.stats_jit import float32_bits, is_tie, quantize_tile  # noqa: E402
from megatron_qat.metrics import block_stats  # noqa: E402
from megatron_qat.numerics import families  # noqa: E402
from megatron_qat.numerics.format import E2M1_MAGNITUDES, INT_VIEW_DTYPES, unpack_nibbles  # noqa: E402
from megatron_qat.numerics.reference import fake_quantize_reference, quantize_reference  # noqa: E402
from megatron_qat.numerics.rules import FLASHINFER_MXFP4, TIES_DOWN_MXFP4, VLLM_ONLINE_MXFP4  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
RULES = (FLASHINFER_MXFP4, VLLM_ONLINE_MXFP4, TIES_DOWN_MXFP4)  # the E2M1 weight rules
pytestmark = pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")  # interpreter


@triton.jit
def _probe_kernel(x_ptr, byte_ptr, amax_ptr, a_ptr, q_ptr, fake_ptr, tie_ptr, KIND: tl.constexpr, BS: tl.constexpr,
                  NB: tl.constexpr, ELEM: tl.constexpr, SCALE: tl.constexpr, TIES: tl.constexpr,
                  FTZ: tl.constexpr):  # fmt: skip
    """Writes what the statistics kernel computes per block and per element for NB blocks."""
    rows = tl.arange(0, NB)
    offs = rows[:, None] * BS + tl.arange(0, BS)[None, :]
    bits = float32_bits(tl.load(x_ptr + offs), KIND)
    byte, amax_bits, a, q, fake = quantize_tile(bits, KIND, SCALE, TIES, FTZ)
    tl.store(byte_ptr + rows, byte)
    tl.store(amax_ptr + rows, amax_bits)
    tl.store(a_ptr + offs, a)
    tl.store(q_ptr + offs, q)
    tl.store(fake_ptr + offs, fake)
    tl.store(tie_ptr + offs, is_tie(a, q).to(tl.int8))


def probe(x: torch.Tensor, rule=FLASHINFER_MXFP4, block_size: int = 32) -> dict:
    """The kernel's per-block/per-element values of ``x [R, K]`` under ``rule`` (a power-of-two
    number of blocks)."""
    blocks = x.numel() // block_size
    x = x.contiguous().to(DEVICE)
    load = x if x.dtype == torch.float16 else x.view(INT_VIEW_DTYPES[x.dtype])
    out = {
        "byte": torch.empty(blocks, dtype=torch.int32, device=DEVICE),
        "amax_bits": torch.empty(blocks, dtype=torch.int32, device=DEVICE),
        "a": torch.empty(x.numel(), dtype=torch.float32, device=DEVICE),
        "q": torch.empty(x.numel(), dtype=torch.float32, device=DEVICE),
        "fake": torch.empty(x.numel(), dtype=torch.float32, device=DEVICE),
        "tie": torch.empty(x.numel(), dtype=torch.int8, device=DEVICE),
    }
    _probe_kernel[(1,)](load, *out.values(), KIND=KIND[x.dtype], BS=block_size, NB=blocks, **rule_constexprs(rule))
    return {k: v.cpu() for k, v in out.items()}


def kernel_codes(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, unpacked) from the kernel's rounded magnitudes and the sign of ``x``."""
    lut = torch.tensor(E2M1_MAGNITUDES)
    magnitude = (q.reshape(-1, 1) == lut).to(torch.uint8).argmax(dim=1).to(torch.uint8)
    assert bool((lut[magnitude.long()] == q.reshape(-1)).all()), "q is not an E2M1 magnitude"
    sign = (x.float().reshape(-1).view(torch.int32) < 0).to(torch.uint8)
    return magnitude | (sign << 3)


@pytest.mark.parametrize("rule", RULES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", families.ALL_FAMILIES)
def test_kernel_values_are_the_reference_bit_for_bit(family, dtype, rule):
    """Scale bytes, codes and fake values of every finite block equal quantize_reference /
    fake_quantize_reference of the rule; |v| equals the torch pass's, so ties are counted on the
    same values."""
    x = families.make(family, (8, 64), dtype, seed=3)
    got = probe(x, rule)
    finite = got["amax_bits"] < 0x7F800000
    assert torch.equal(finite, torch.isfinite(x.float().reshape(16, 32)).all(dim=1))
    keep = finite.repeat_interleave(32)
    ref_fake = fake_quantize_reference(x, 32, rule=rule).reshape(-1)
    ints = INT_VIEW_DTYPES[dtype]
    assert torch.equal(got["fake"].to(dtype).view(ints)[keep], ref_fake.view(ints)[keep])
    _, _, _, v, _ = block_stats.quantize_for_stats(x, 32, rule)
    assert torch.equal(got["a"].view(torch.int32)[keep], v.abs().reshape(-1).view(torch.int32)[keep])
    if bool(finite.all()):
        ref_codes, ref_scales = quantize_reference(x, 32, rule=rule)
        assert torch.equal(got["byte"].to(torch.uint8), ref_scales.reshape(-1))
        assert torch.equal(kernel_codes(x, got["q"]), unpack_nibbles(ref_codes).reshape(-1))
    else:  # nan_inf_blocks: the finite blocks against the reference of those blocks alone
        xf = x.reshape(16, 32)[finite]
        ref_codes, ref_scales = quantize_reference(xf, 32, rule=rule)
        assert torch.equal(got["byte"][finite].to(torch.uint8), ref_scales.reshape(-1))
        assert torch.equal(kernel_codes(xf, got["q"][keep]), unpack_nibbles(ref_codes).reshape(-1))


def _on_the_grid(dtype) -> torch.Tensor:
    """Blocks whose first element is 6 (scale byte 127, so |v| = |x|) and whose other elements are
    every ``dtype`` magnitude in [0, 6] (bf16: all of them; fp16 / fp32: the E2M1 midpoints and grid
    values and their neighbours up to 4 ulps away), in a power-of-two number of blocks."""
    ints = INT_VIEW_DTYPES[dtype]
    if dtype == torch.bfloat16:
        mags = torch.arange(0, int(torch.tensor(6.0, dtype=dtype).view(ints)) + 1, dtype=ints).view(dtype)
    else:
        centre = torch.tensor([*block_stats.TIE_POINTS, *E2M1_MAGNITUDES[1:]], dtype=dtype).view(ints)
        mags = (centre[:, None] + torch.arange(-4, 5, dtype=ints)).reshape(-1).view(dtype).clamp(max=6.0)
    per_block = 31
    n_blocks = triton.next_power_of_2(-(-mags.numel() // per_block))
    body = torch.zeros(n_blocks * per_block, dtype=dtype)
    body[: mags.numel()] = mags
    six = torch.full((n_blocks, 1), 6.0, dtype=dtype)
    return torch.cat([six, body.reshape(n_blocks, per_block)], dim=1)


@pytest.mark.parametrize("rule", RULES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tie_test_is_the_decision_point_definition(dtype, rule):
    """is_tie(a, q) holds exactly for |v| on a midpoint of adjacent E2M1 magnitudes, whichever way
    the rule sends the tie."""
    x = _on_the_grid(dtype)
    got = probe(x, rule)
    assert bool((got["byte"] == 127).all())
    a = got["a"].double()
    mags = x.double().abs().reshape(-1)
    assert torch.equal(a, torch.where(mags < 2.0**-126, 0.0, mags) if rule.ftz else mags)
    on_midpoint = torch.zeros_like(a, dtype=torch.bool)
    for t in block_stats.TIE_POINTS:
        on_midpoint |= a == t
    assert int(on_midpoint.sum()) >= len(block_stats.TIE_POINTS)
    assert torch.equal(got["tie"].bool(), on_midpoint)
    assert torch.equal(kernel_codes(x, got["q"]), unpack_nibbles(quantize_reference(x, 32, rule=rule)[0]).reshape(-1))


def _ragged(dtype=torch.bfloat16) -> list[torch.Tensor]:
    big = families.make("random_extreme", (24, 96), dtype, seed=2)
    big[5, 7] = float("inf")
    return [big, torch.empty(0, 32, dtype=dtype), families.make("nan_inf_blocks", (3, 64), dtype, seed=4),
            families.make("ties", (5, 32), dtype, seed=3)]  # fmt: skip


@pytest.mark.parametrize("elems_per_tile, programs", [(32, 1), (64, 3), (256, 7), (4096, None), (128, 100)])
def test_launch_shape_changes_no_integer_result(elems_per_tile, programs):
    """Tiles of 1..128 blocks, 1..100 programs (several per expert, loops over many tiles, idle
    programs, partial last tiles): the integers are those of the default launch, the sums agree."""
    xs = [w.to(DEVICE) for w in _ragged()]
    want_sums, want_ints = triton_stats.module_stats(xs, 32)
    sums, ints = triton_stats.module_stats(xs, 32, elems_per_tile=elems_per_tile, programs=programs)
    assert torch.equal(ints, want_ints)
    assert sums.tolist() == pytest.approx(want_sums.tolist(), rel=1e-12, abs=0.0)
    again, _ = triton_stats.module_stats(xs, 32, elems_per_tile=elems_per_tile, programs=programs)
    assert torch.equal(again.view(torch.int64), sums.view(torch.int64))  # the same launch: the same bits


@pytest.mark.parametrize("block_size", [2, 16, 48, 64])
def test_other_block_sizes_agree_with_the_torch_pass(block_size):
    """Block sizes that are not 32, including padded tiles (48 -> 64 lanes)."""
    x = families.make("random_extreme", (6, 192), torch.float16, seed=7).to(DEVICE)
    ker = block_stats.measure([x, x[:2]], block_size, impl="triton")
    ref = block_stats.measure([x, x[:2]], block_size, impl="reference")
    assert torch.equal(ker.counts, ref.counts) and torch.equal(ker.scale_hist, ref.scale_hist)
    assert ker.sums.tolist() == pytest.approx(ref.sums.tolist(), rel=1e-12, abs=0.0)


def test_grouped_stats_keeps_its_table_and_rebuilds_for_new_weights():
    experts = [w.to(DEVICE) for w in _ragged()]
    meter = block_stats.GroupedStats(32, impl="triton")
    first = meter(experts, (4, 5, 6, 7))
    second = meter(experts, (4, 5, 6, 7))
    assert meter.table_builds == 1
    one_shot = block_stats.measure(experts, 32, (4, 5, 6, 7), impl="triton")
    for got in (first, second):
        assert torch.equal(got.counts, one_shot.counts) and torch.equal(got.scale_hist, one_shot.scale_hist)
        assert torch.equal(got.nonfinite_per_expert, one_shot.nonfinite_per_expert)
        assert torch.equal(got.sums.view(torch.int64), one_shot.sums.view(torch.int64))
    meter([w.clone() for w in experts], (4, 5, 6, 7))  # new storage: new pointers
    assert meter.table_builds == 2


def test_reference_impl_builds_no_table():
    meter = block_stats.GroupedStats(32, impl="reference")
    meter([torch.randn(4, 64, device=DEVICE)])
    assert meter.table_builds == 0


def test_auto_runs_the_kernel_on_cuda_only(monkeypatch):
    """No impl and no MEGATRON_QAT_KERNEL: the kernel for CUDA tensors, the torch pass elsewhere."""
    monkeypatch.delenv("MEGATRON_QAT_KERNEL", raising=False)
    calls = []
    real = triton_stats.module_stats
    monkeypatch.setattr(triton_stats, "module_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    block_stats.measure([torch.randn(4, 64, device=DEVICE)], 32)
    assert calls == ([1] if DEVICE == "cuda" else [])


def test_forced_kernel_that_cannot_run_is_refused(monkeypatch):
    monkeypatch.setenv("MEGATRON_QAT_KERNEL", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="MEGATRON_QAT_KERNEL=triton was requested.*TRITON_INTERPRET=1"):
        block_stats.measure([torch.zeros(4, 64)], 32)


def test_parameters_and_non_contiguous_views_are_measured_as_their_values():
    """A Parameter (requires_grad, as the hook passes the master weights) is read in place; a
    non-contiguous view is copied first. Both give the statistics of their values."""
    x = families.make("random_1", (8, 128), torch.bfloat16, seed=9).to(DEVICE)
    param = torch.nn.Parameter(x.clone())
    view = torch.stack([x, -x], dim=-1)[..., 0]  # the same values, column stride 2
    want = block_stats.measure([x], 32, impl="triton")
    for got in (block_stats.measure([param], 32, impl="triton"), block_stats.measure([view], 32, impl="triton")):
        assert torch.equal(got.counts, want.counts) and torch.equal(got.scale_hist, want.scale_hist)
        assert torch.equal(got.sums.view(torch.int64), want.sums.view(torch.int64))
        assert not got.sums.requires_grad
