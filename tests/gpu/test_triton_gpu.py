"""The Triton MXFP4 kernel on the GPU at full expert sizes, bit for bit against the reference run
on the same GPU; and the default (auto) dispatch of fake_quantize / fake_quantize_ste on CUDA.

Run on the lent GPU: ``python -m pytest -q tests/gpu/test_triton_gpu.py``.
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")]

from _helpers import require  # noqa: E402

triton = require("triton", "the triton extra is not installed (pip install -e '.[triton]')")

from megatron_qat import mxfp4  # noqa: E402
from megatron_qat.kernels import triton_qdq  # noqa: E402
from megatron_qat.numerics.families import ALL_FAMILIES, FINITE_FAMILIES, compare_bits, make  # noqa: E402
from megatron_qat.mxfp4.dispatch import KERNEL_ENV, resolve_impl  # noqa: E402
from megatron_qat.numerics.reference import fake_quantize_reference, quantize_reference  # noqa: E402

FULL_SHAPE = (8, 1536, 2048)


def _cuda(family, shape, dtype, seed=0):
    return make(family, shape, dtype, seed).cuda()


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_full_size_fake_quantize_bit_exact(family, dtype):
    x = _cuda(family, FULL_SHAPE, dtype)
    out = triton_qdq.fake_quantize(x)
    ref = fake_quantize_reference(x)
    msg = compare_bits(out, ref)
    assert msg is None, msg


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("family", FINITE_FAMILIES)
def test_quantize_codes_scales_bit_exact(family, dtype):
    x = _cuda(family, (4, 768, 2048), dtype, seed=1)
    codes, scales = triton_qdq.quantize(x)
    ref_codes, ref_scales = quantize_reference(x)
    assert compare_bits(codes, ref_codes) is None, compare_bits(codes, ref_codes)
    assert compare_bits(scales, ref_scales) is None, compare_bits(scales, ref_scales)


@pytest.mark.parametrize("dtype", (torch.float32,), ids=str)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_fp32_fake_quantize_bit_exact(family, dtype):
    x = _cuda(family, (2, 1024, 2048), dtype)
    msg = compare_bits(triton_qdq.fake_quantize(x), fake_quantize_reference(x))
    assert msg is None, msg


@pytest.mark.parametrize("n_experts, rows, k", [(8, 1536, 2048), (16, 2048, 768), (128, 96, 2048), (32, 1024, 2880)])
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_grouped_experts_one_launch_bit_exact(n_experts, rows, k, dtype):
    xs = [
        _cuda(ALL_FAMILIES[i % len(ALL_FAMILIES)], (rows - 32 * (i % 3), k), dtype, seed=i) for i in range(n_experts)
    ]
    outs = triton_qdq.fake_quantize_many(xs)
    for i, (out, x) in enumerate(zip(outs, xs)):
        msg = compare_bits(out, fake_quantize_reference(x))
        assert msg is None, f"expert {i}: {msg}"


def test_grouped_quantize_many_bit_exact():
    xs = [_cuda("random_bits", (256 + 32 * i, 2048), torch.bfloat16, seed=i) for i in range(8)]
    for (codes, scales), x in zip(triton_qdq.quantize_many(xs), xs):
        ref_codes, ref_scales = quantize_reference(x)
        assert compare_bits(codes, ref_codes) is None and compare_bits(scales, ref_scales) is None


def test_grouped_unaligned_members():
    base = _cuda("random_extreme", (4 * 2048 + 32,), torch.bfloat16).view(-1)
    xs = [base[32 * j + 2 : 32 * j + 2 + 2048].view(1, 2048) for j in range(3)]  # 4-byte aligned only
    for out, x in zip(triton_qdq.fake_quantize_many(xs), xs):
        assert compare_bits(out, fake_quantize_reference(x)) is None


def test_auto_dispatch_uses_the_kernel_on_cuda(monkeypatch):
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    x = _cuda("random_1", (4, 256, 2048), torch.bfloat16)
    assert resolve_impl(x, None) == "triton"
    calls = []
    real = triton_qdq.fake_quantize
    monkeypatch.setattr(triton_qdq, "fake_quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = mxfp4.fake_quantize(x)
    assert calls == [1]
    assert compare_bits(out, fake_quantize_reference(x)) is None


def test_fake_quantize_ste_default_path_on_cuda_and_identity_gradient(monkeypatch):
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    w = _cuda("random_1e-3", (4, 512, 2048), torch.bfloat16).requires_grad_(True)
    calls = []
    real = triton_qdq.fake_quantize
    monkeypatch.setattr(triton_qdq, "fake_quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = mxfp4.fake_quantize_ste(w)
    assert calls == [1]
    assert compare_bits(out.detach(), fake_quantize_reference(w.detach())) is None
    grad = torch.randn_like(w)
    out.backward(grad)
    assert torch.equal(w.grad.view(torch.int16), grad.view(torch.int16))


def test_env_forces_reference_on_cuda(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "reference")
    x = _cuda("random_1", (2, 64), torch.bfloat16)
    assert resolve_impl(x, None) == "reference"


def test_no_host_sync_on_fake_quantize_paths():
    x = _cuda("nan_inf_blocks", (4, 256, 2048), torch.bfloat16)
    xs = [x[i] for i in range(4)]
    q = mxfp4.GroupedFakeQuantizer(32, impl="triton")
    triton_qdq.fake_quantize(x), q(xs), triton_qdq.fake_quantize_many(xs)  # warm up (compile, q's table)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        triton_qdq.fake_quantize(x)
        q(xs)
        triton_qdq.fake_quantize_many(xs)  # per-call table: a pinned, non-blocking copy, still no sync
        mxfp4.fake_quantize(x, impl="reference")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_non_default_device_index():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs to check the device guard")
    x = _cuda("random_bits", (2, 128, 2048), torch.bfloat16).to("cuda:1")
    assert compare_bits(triton_qdq.fake_quantize(x), fake_quantize_reference(x)) is None
