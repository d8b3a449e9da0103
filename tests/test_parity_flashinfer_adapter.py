"""The FlashInfer adapter's logic on CPU, with a stand-in module (the real kernel runs in
tests/gpu): scale-buffer reshape, +0.0 decode of 0x8 and its normalisation, the canary, and
the compute-capability refusal."""

import types

import pytest
import torch

from megatron_qat.parity import golden
from megatron_qat.parity import references as refs
from megatron_qat.parity.compare import BatchInput, TensorResult, compare_batch
from megatron_qat.parity.errors import ParityError
from megatron_qat.numerics.families import synthetic_tensors


def _fake_flashinfer(garbage=False):
    """fp4_quantize as FlashInfer's linear layout (scale buffer padded to 16 rows, flat);
    mxfp4_dequantize_host with FlashInfer's table (0x8 -> +0.0)."""

    def fp4_quantize(x, global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout=True):
        assert (global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout) == (None, 32, True, False)
        m, k = x.shape
        if garbage:
            return torch.full((m, k // 2), 0xA5, dtype=torch.uint8), torch.full((((m + 15) // 16) * 16 * k // 32,), 0xA5, dtype=torch.uint8)
        codes, scales = golden.quantize(x.float().cpu().numpy())
        flat = torch.full((((m + 15) // 16) * 16 * k // 32,), 0x77, dtype=torch.uint8)
        flat[: m * k // 32] = torch.from_numpy(scales).reshape(-1)
        return torch.from_numpy(codes), flat

    def mxfp4_dequantize_host(weight, scale, group_size=32):
        values = torch.from_numpy(golden.decode(weight.numpy(), scale.numpy()))
        return torch.where(values == 0, torch.zeros_like(values), values)  # +0.0 for 0x8

    return types.SimpleNamespace(fp4_quantize=fp4_quantize, mxfp4_dequantize_host=mxfp4_dequantize_host, __version__="fake")


def test_adapter_reshapes_padded_scales_and_canary_passes():
    ref = refs.FlashInferReference(_fake_flashinfer(), "cpu", "test")
    ref.check_canary()
    x = torch.randn(5, 96).bfloat16()
    payload, values = ref.quantize(x)
    g_codes, g_scales = golden.quantize(x.float().numpy())
    assert payload.block_size == 32 and torch.equal(payload.codes, torch.from_numpy(g_codes))
    assert torch.equal(payload.scales, torch.from_numpy(g_scales))


def test_negative_zero_normalised_against_plus_zero_decode():
    from megatron_qat.parity.references import Ours

    x = dict(synthetic_tensors())["synthetic/bf16/zeros_negzero"]
    fi = refs.FlashInferReference(_fake_flashinfer(), "cpu", "test")
    ours = Ours("cpu", None, fi.block_size).run(x)
    r = TensorResult("t", None, list(x.shape), "bfloat16", x.numel())
    compare_batch(r, BatchInput(x, torch.arange(x.shape[0]), tuple(x.shape)), fi.quantize(x), ours, negative_zero_normalised=True)
    assert (r.code_mismatches, r.scale_mismatches, r.value_mismatches, r.dequant_mismatches) == (0, 0, 0, 0)
    r2 = TensorResult("t", None, list(x.shape), "bfloat16", x.numel())
    compare_batch(r2, BatchInput(x, torch.arange(x.shape[0]), tuple(x.shape)), fi.quantize(x), ours, negative_zero_normalised=False)
    assert r2.value_mismatches > 0 and r2.code_mismatches == 0  # -0.0 vs +0.0 without normalisation


def test_canary_refuses_garbage():
    ref = refs.FlashInferReference(_fake_flashinfer(garbage=True), "cpu", "test")
    with pytest.raises(ParityError, match="canary failed.*--reference golden"):
        ref.check_canary()


def _pretend_gpu(monkeypatch, cap):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Pretend GPU")
    monkeypatch.setattr(refs, "FLASHINFER_DEVICE", "cpu")


def test_sm90_refusal_auto_fallback_and_override(monkeypatch):
    _pretend_gpu(monkeypatch, (9, 0))
    with pytest.raises(ParityError, match=r"9\.0 < 10\.0.*compiled only for sm_100\+.*--reference golden"):
        refs.choose_reference("flashinfer", allow_unsupported_gpu=False)
    auto = refs.choose_reference("auto", allow_unsupported_gpu=False)
    assert auto.name == "golden" and "9.0 < 10.0" in auto.reason
    monkeypatch.setattr(refs, "_import_flashinfer", lambda: _fake_flashinfer(garbage=True))
    with pytest.raises(ParityError, match="canary failed"):
        refs.choose_reference("flashinfer", allow_unsupported_gpu=True)


def test_sm100_auto_picks_flashinfer_after_canary(monkeypatch):
    _pretend_gpu(monkeypatch, (10, 0))
    monkeypatch.setattr(refs, "_import_flashinfer", lambda: _fake_flashinfer())
    ref = refs.choose_reference("auto", allow_unsupported_gpu=False)
    assert ref.name == "flashinfer" and ref.describe()["canary"] == "passed"

    def missing():
        raise ImportError("No module named 'flashinfer'")

    monkeypatch.setattr(refs, "_import_flashinfer", missing)
    assert "not importable" in refs.choose_reference("auto", allow_unsupported_gpu=False).reason
    with pytest.raises(ParityError, match="cannot import flashinfer"):
        refs.choose_reference("flashinfer", allow_unsupported_gpu=False)


def test_flashinfer_reference_skips_float32():
    ref = refs.FlashInferReference(_fake_flashinfer(), "cpu", "test")
    assert "bfloat16/float16" in ref.unsupported(torch.float32) and ref.unsupported(torch.bfloat16) is None
