"""Issues 14 and 15 on the GPU: the Triton kernel of every rule at full size against the reference
run on the same GPU (integer views), the activation QDQ and the prepared launches (the compiled
kernel handle is really used, any token count reuses it, unaligned inputs stay exact), no host sync,
and CUDA-graph capture of the activation QDQ and of a warmed-up quantizer of another rule.

Run on the lent GPU: ``python -m pytest -q tests/gpu/test_rules_gpu.py``.
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")]

from _helpers import require  # noqa: E402

triton = require("triton", "the triton extra is not installed (pip install -e '.[triton]')")

from megatron_qat import mxfp4  # noqa: E402
from megatron_qat.kernels import prepared, triton_qdq  # noqa: E402
from megatron_qat.numerics.families import ALL_FAMILIES, FINITE_FAMILIES, compare_bits, make  # noqa: E402
from megatron_qat.numerics.reference import fake_quantize_reference, quantize_reference  # noqa: E402

RULES = tuple(mxfp4.RULES.values())
SHAPE = (2, 512, 2048)  # 2M elements: every branch many times, generated quickly on the host


def _cuda(family, shape, dtype, seed=0):
    return make(family, shape, dtype, seed).cuda()


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("rule", RULES, ids=str)
def test_every_rule_full_size_fake_quantize(rule, family, dtype):
    x = _cuda(family, SHAPE, dtype)
    out = triton_qdq.fake_quantize(x, rule=rule)
    assert compare_bits(out, fake_quantize_reference(x, rule=rule)) is None, compare_bits(out, fake_quantize_reference(x, rule=rule))


@pytest.mark.parametrize("family", FINITE_FAMILIES)
@pytest.mark.parametrize("rule", RULES, ids=str)
def test_every_rule_quantize(rule, family):
    x = _cuda(family, (2, 512, 2048), torch.bfloat16, seed=1)
    (c, s), (rc, rs) = triton_qdq.quantize(x, rule=rule), quantize_reference(x, rule=rule)
    assert compare_bits(s, rs) is None and compare_bits(c, rc) is None


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_activation_prepared_launch_any_token_count(rule):
    quantizer = mxfp4.ActivationFakeQuantizer(rule)  # what the runtime keeps per module
    for tokens in (4096, 4096, 4093, 17, 1, 8192, 4096):  # n_blocks divisible by 16 or not: one compiled kernel
        x = _cuda("random_extreme", (tokens, 2048), torch.bfloat16, seed=tokens)
        got = quantizer(x)
        assert compare_bits(got, fake_quantize_reference(x, rule=rule)) is None, tokens
    launches = quantizer.launches.handles
    keys = [k for k in launches if k[2] == rule.name and k[1] == torch.bfloat16]
    assert keys and all(isinstance(launches[k][0], prepared.CompiledLaunch) for k in keys)


def test_activation_unaligned_and_non_contiguous_inputs():
    base = _cuda("random_bits", (65, 2880), torch.bfloat16)
    unaligned = base.view(-1)[1 : 1 + 64 * 2880].view(64, 2880)  # data_ptr % 16 == 2
    assert unaligned.data_ptr() % 16
    for x in (unaligned, base[:, :2048], base.t().contiguous().t()[:, :1024]):
        for rule in (mxfp4.FLASHINFER_MXFP8, mxfp4.FLASHINFER_MXFP4):
            assert compare_bits(mxfp4.fake_quantize_activation(x, rule), fake_quantize_reference(x.contiguous(), rule=rule)) is None


def test_no_host_sync_after_warm_up():
    x = _cuda("random_1", (4096, 2048), torch.bfloat16).requires_grad_(True)
    ws = [_cuda("random_1", (768, 2048), torch.bfloat16, seed=i) for i in range(8)]
    q = mxfp4.GroupedFakeQuantizer(32, rule=mxfp4.VLLM_ONLINE_MXFP4)
    mxfp4.fake_quantize_activation(x, mxfp4.FLASHINFER_MXFP8), q(ws)  # warm up: compile, table
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = mxfp4.fake_quantize_activation(x, mxfp4.FLASHINFER_MXFP8)
        out.backward(torch.ones_like(out))
        q(ws)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert q._prepared.fast is not None  # the compiled-kernel handle, not Triton's binder


def test_activation_and_quantizer_replay_in_a_cuda_graph():
    x = _cuda("random_extreme", (4096, 2880), torch.bfloat16)
    ws = [_cuda("ties", (2880, 2880), torch.bfloat16, seed=i) for i in range(4)]
    q = mxfp4.GroupedFakeQuantizer(32, rule=mxfp4.TIES_DOWN_MXFP4)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        mxfp4.fake_quantize_activation(x, mxfp4.FLASHINFER_MXFP8), q(ws)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        act = mxfp4.fake_quantize_activation(x, mxfp4.FLASHINFER_MXFP8)
        outs = q(ws)
    x.copy_(_cuda("e4m3_ties", (4096, 2880), torch.bfloat16, seed=9))
    for w in ws:
        w.mul_(-1)
    graph.replay()
    torch.cuda.synchronize()
    assert compare_bits(act, fake_quantize_reference(x, rule=mxfp4.FLASHINFER_MXFP8)) is None
    for out, w in zip(outs, ws):
        assert compare_bits(out, fake_quantize_reference(w, rule=mxfp4.TIES_DOWN_MXFP4)) is None
