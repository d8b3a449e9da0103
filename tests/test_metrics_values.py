"""megatron_qat.metrics values: both executions of the statistics (the torch pass and the Triton
kernel, CPU: Triton interpreter; on a GPU both run on CUDA) follow the numerics reference bit for
bit, and every statistic equals an independent float64 computation on the adversarial input
families: counters and histograms exactly, the float64 sums within 1e-12 (their summation order is
the execution's own; docs/metrics.md). tests/test_metrics_kernel.py checks the kernel's per-element
values and its launch.

The float64 side uses tests/scalar_oracle.py (per-element Python floats: frexp scale exponent,
nearest-value E2M1 search with ties to the even code), so it shares no code with the pass.
"""

from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pytest
import torch

import scalar_oracle
from megatron_qat.metrics import block_stats
from megatron_qat.metrics.reduction import reduce, scalars
from megatron_qat.numerics import families
from megatron_qat.numerics.format import INT_VIEW_DTYPES, pack_nibbles
from megatron_qat.numerics.reference import fake_quantize_reference, quantize_reference
from megatron_qat.numerics.rules import FLASHINFER_MXFP4, TIES_DOWN_MXFP4, VLLM_ONLINE_MXFP4, ScaleRounding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SHAPE = (2, 4, 64)  # 2 experts [4, 64]: 16 blocks of 32
TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
RULES = (FLASHINFER_MXFP4, VLLM_ONLINE_MXFP4, TIES_DOWN_MXFP4)  # the E2M1 weight rules


# The kernel execution: skipped without Triton locally, FAILS under CI=true (.ci/run installs it).
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None and os.environ.get("CI") != "true",
    reason="the triton extra is not installed (pip install -e '.[triton]')",
)
IMPLS = ("reference", pytest.param("triton", marks=needs_triton))
pytestmark = pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")  # interpreter


@pytest.mark.parametrize("rule", RULES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", families.ALL_FAMILIES)
def test_pass_follows_the_reference_bit_for_bit(family, dtype, rule):
    x = families.make(family, (8, 64), dtype, seed=3)
    codes, byte, finite, _, fake = block_stats.quantize_for_stats(x, 32, rule)
    ref_fake = fake_quantize_reference(x, 32, rule=rule).reshape(fake.shape)
    ints = INT_VIEW_DTYPES[dtype]
    keep = finite.unsqueeze(-1).expand(fake.shape)
    assert torch.equal(fake.view(ints)[keep], ref_fake.view(ints)[keep])
    if bool(finite.all()):
        ref_codes, ref_scales = quantize_reference(x, 32, rule=rule)
        assert torch.equal(pack_nibbles(codes.reshape(8, 64)), ref_codes)
        assert torch.equal(byte.to(torch.uint8), ref_scales)
    else:  # the reference writes NaN for every element of a non-finite block
        assert bool(torch.isnan(ref_fake.float())[~keep].all())


def _expected(x: torch.Tensor, block_size: int = 32, rule=FLASHINFER_MXFP4) -> dict:
    """The raw sums of ``x [E, R, K]`` under ``rule`` in float64 Python, from the scalar oracle."""
    rows = x.reshape(-1, x.shape[-1])
    x32 = rows.float().numpy()
    out = dict.fromkeys(block_stats.COUNT_FIELDS, 0)
    out.update(sq_err=0.0, sq_master=0.0, hist=[0] * 256)
    for r in range(x32.shape[0]):
        for b in range(x32.shape[1] // block_size):
            blk = x32[r, b * block_size : (b + 1) * block_size].astype(np.float64)
            if not np.isfinite(blk).all():
                out["nonfinite_blocks"] += 1
                continue
            codes, byte = scalar_oracle.quantize_block([float(v) for v in blk], rule)
            out["finite_blocks"] += 1
            out["finite_elements"] += block_size
            out["hist"][byte] += 1
            if byte == 0 and rule.scale is ScaleRounding.CEIL:  # the scale multiplies every element by 0
                out["flushed_blocks"] += 1
                out["flushed_nonzero_blocks"] += int(np.abs(blk).max() > 0)
            mult = scalar_oracle.multiplier(byte, rule)
            fake = torch.tensor(
                [scalar_oracle.element_value(c, rule) * 2.0 ** (byte - 127) for c in codes], dtype=torch.float64
            ).to(x.dtype).double().numpy()
            for v, c, f in zip(blk, codes, fake):
                scaled = 0.0 if (rule.ftz and abs(v) < scalar_oracle.TINY) else abs(v) * mult
                out["ties"] += int(scaled in TIES)
                out["at_max"] += int((c & 7) == 7)
                out["sq_err"] += (f - v) ** 2
                out["sq_master"] += v * v
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rule", RULES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", families.ALL_FAMILIES)
def test_statistics_equal_a_float64_computation(family, dtype, rule, impl):
    x = families.make(family, SHAPE, dtype, seed=5)
    stats = block_stats.measure([x[0].to(DEVICE), x[1].to(DEVICE)], 32, rule=rule, impl=impl)
    got = reduce({"layer_1/fc1": stats})["layer_1/fc1"]
    want = _expected(x, rule=rule)
    for field in block_stats.COUNT_FIELDS + ("hist",):
        assert got[field] == want[field], field
    assert got["sq_master"] == pytest.approx(want["sq_master"], rel=1e-12, abs=0.0)
    assert got["sq_err"] == pytest.approx(want["sq_err"], rel=1e-12, abs=0.0)
    assert stats.nonfinite_per_expert.sum().item() == want["nonfinite_blocks"]


def test_scalars_from_raw_sums():
    raw = dict.fromkeys(block_stats.COUNT_FIELDS, 0)
    raw.update(finite_blocks=4, finite_elements=128, flushed_blocks=1, flushed_nonzero_blocks=1, at_max=8, ties=2,
               nonfinite_blocks=3, sq_err=1.0, sq_master=100.0, hist=[0] * 256)
    raw["hist"][120], raw["hist"][125], raw["hist"][127] = 1, 2, 1  # sorted: 120 125 125 127
    assert scalars(raw) == {
        "rel_rmse": 0.1,
        "flushed_block_frac": 0.25,
        "flushed_nonzero_blocks": 1.0,
        "e2m1_max_frac": 8 / 128,
        "tie_frac": 2 / 128,
        "nonfinite_blocks": 3.0,
        "scale_byte_min": 120.0,
        "scale_byte_median": 125.0,
        "scale_byte_max": 127.0,
    }
    raw.update(finite_blocks=0, finite_elements=0, sq_err=0.0, sq_master=0.0, hist=[0] * 256)
    s = scalars(raw)  # all blocks non-finite: no scale distribution, no division by zero
    assert s["rel_rmse"] == 0.0 and "scale_byte_median" not in s


@pytest.mark.parametrize("impl", IMPLS)
def test_grouped_weight_list_and_list_of_experts_agree(impl):
    x = families.make("random_extreme", (3, 8, 64), torch.bfloat16, seed=1).to(DEVICE)
    whole = reduce({"a": block_stats.measure([x], 32, impl=impl)})["a"]
    listed = reduce({"a": block_stats.measure(list(x.unbind(0)), 32, impl=impl)})["a"]
    assert whole == listed


def test_row_chunks_of_the_torch_pass_agree(monkeypatch):
    x = families.make("random_extreme", (3, 8, 64), torch.bfloat16, seed=1)
    whole = reduce({"a": block_stats.measure([x], 32, impl="reference")})["a"]
    monkeypatch.setattr(block_stats, "_CHUNK_ELEMENTS", 64)  # one row per chunk
    chunked = reduce({"a": block_stats.measure([x], 32, impl="reference")})["a"]
    assert whole["hist"] == chunked["hist"] and all(whole[f] == chunked[f] for f in block_stats.COUNT_FIELDS)
    assert chunked["sq_err"] == pytest.approx(whole["sq_err"], rel=1e-12)


def _ragged_experts(dtype):
    """Experts of different shapes (multi-tile, partial last tile, an empty one, a 3-D one), with
    non-finite blocks in some: every path of the grouped launch."""
    big = families.make("random_extreme", (24, 96), dtype, seed=2)
    big[5, 7] = float("nan")
    small = families.make("ties", (2, 32), dtype, seed=3)
    extra = families.make("nan_inf_blocks", (3, 64), dtype, seed=4)
    return [big, torch.empty(0, 96, dtype=dtype), small, extra]


@needs_triton
@pytest.mark.parametrize("rule", RULES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_two_executions_agree(dtype, rule):
    """One definition, two executions: the kernel and the torch pass give the same counters,
    histogram and per-expert non-finite counts; their float64 sums agree within 1e-12."""
    experts = [w.to(DEVICE) for w in _ragged_experts(dtype)]
    ids = (10, 11, 12, 13)
    ref = block_stats.measure(experts, 32, ids, rule=rule, impl="reference")
    ker = block_stats.measure(experts, 32, ids, rule=rule, impl="triton")
    assert torch.equal(ker.counts, ref.counts) and torch.equal(ker.scale_hist, ref.scale_hist)
    assert torch.equal(ker.nonfinite_per_expert, ref.nonfinite_per_expert)
    assert ker.nonfinite_per_expert.tolist()[0] == 1 and ker.expert_ids == ids
    assert ker.sums.dtype == torch.float64 and ker.sums.shape == (2,)
    assert ker.sums.tolist() == pytest.approx(ref.sums.tolist(), rel=1e-12, abs=0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_per_expert_nonfinite_counts_and_ids(impl):
    x = torch.randn(3, 4, 64)
    x[1, 2, 5] = float("nan")
    x[1, 0, 40] = float("inf")
    stats = block_stats.measure(list(x.to(DEVICE).unbind(0)), 32, expert_ids=(6, 7, 8), impl=impl)
    assert stats.nonfinite_per_expert.tolist() == [0, 2, 0] and stats.expert_ids == (6, 7, 8)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_weights_are_refused_with_the_shape(impl):
    with pytest.raises(ValueError, match=r"shape \(4, 48\).*block size 32"):
        block_stats.measure([torch.zeros(4, 48, device=DEVICE)], 32, impl=impl)
    with pytest.raises(ValueError, match="2 expert weights but 1 expert ids"):
        block_stats.measure([torch.zeros(4, 32, device=DEVICE), torch.zeros(4, 32, device=DEVICE)], 32,
                            expert_ids=(0,), impl=impl)  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
def test_flushed_nonzero_block_is_counted(impl):
    """A block whose amax * RN(1/6) is subnormal gets scale byte 0: flushed, its values lost."""
    x = torch.zeros(1, 64)
    x[0, 3] = 2.0**-125  # normal, but 2**-125 / 6 < 2**-126: byte 0, fake value 0
    x[0, 40] = 1.0  # second block healthy
    raw = reduce({"a": block_stats.measure([x.to(DEVICE)], 32, impl=impl)})["a"]
    assert (raw["flushed_blocks"], raw["flushed_nonzero_blocks"], raw["hist"][0]) == (1, 1, 1)
    assert raw["sq_err"] == pytest.approx((2.0**-125) ** 2, rel=1e-12)
    assert raw == _expected(x.reshape(1, 1, 64)) | {"sq_err": raw["sq_err"], "sq_master": raw["sq_master"]}


@pytest.mark.parametrize("impl", IMPLS)
def test_even_scale_byte_zero_does_not_flush(impl):
    """Under VLLM_ONLINE_MXFP4 byte 0 multiplies by 2**127: the same tiny block keeps its value."""
    x = torch.zeros(1, 64)
    x[0, 3] = 2.0**-125
    raw = reduce({"a": block_stats.measure([x.to(DEVICE)], 32, rule=VLLM_ONLINE_MXFP4, impl=impl)})["a"]
    assert (raw["flushed_blocks"], raw["flushed_nonzero_blocks"], raw["hist"][0]) == (0, 0, 2)
    assert raw["sq_err"] == 0.0  # 2**-125 * 2**127 = 4: on the grid, dequantized exactly
    assert raw == _expected(x.reshape(1, 1, 64), rule=VLLM_ONLINE_MXFP4) | {"sq_master": raw["sq_master"]}


@pytest.mark.parametrize("impl", IMPLS)
def test_only_e2m1_rules_are_measured(impl):
    from megatron_qat.numerics.rules import FLASHINFER_MXFP8

    with pytest.raises(ValueError, match="flashinfer-mxfp8 has e4m3 elements; the statistics are defined for E2M1"):
        block_stats.measure([torch.zeros(4, 64, device=DEVICE)], 32, rule=FLASHINFER_MXFP8, impl=impl)
    with pytest.raises(TypeError, match="rule must be a megatron_qat.numerics.rules.Rule"):
        block_stats.GroupedStats(32, rule="flashinfer-mxfp4")
