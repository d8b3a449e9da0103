"""Issue 9 (lean hot path): the public MXFP4 API as ``torch.library`` custom ops, traced by
``torch.compile(fullgraph=True)`` without graph breaks, bit-identical to the eager calls.

CPU only (backend ``aot_eager``: dynamo + AOT autograd, no inductor codegen, so it stays fast);
``impl`` is auto (the reference on CPU) except where the Triton interpreter is asked for. Every
comparison is on integer views.
"""

import pytest
import torch

from _helpers import require
from megatron_qat import mxfp4
from megatron_qat.numerics.families import compare_bits, make

OPS = torch.ops.megatron_qat


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    monkeypatch.delenv("MEGATRON_QAT_KERNEL", raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _x(shape=(4, 3, 64), dtype=torch.bfloat16, family="random_bits", seed=0):
    return make(family, shape, dtype, seed)


def _public_calls(x, w1, w2):
    fq = mxfp4.fake_quantize(x)
    codes, scales = mxfp4.quantize(x)
    many = mxfp4.fake_quantize_many([w1, w2])
    pairs = mxfp4.quantize_many([w1, w2])
    return fq, codes, scales, many[0], many[1], pairs[0][0], pairs[0][1], pairs[1][0], pairs[1][1]


def _inputs():
    return _x(), _x((8, 64), seed=1), _x((2, 96), seed=2)


def test_public_api_compiles_with_fullgraph_and_matches_eager_bits():
    x, w1, w2 = _inputs()
    compiled = torch.compile(_public_calls, fullgraph=True, backend="aot_eager")
    got, want = compiled(x, w1, w2), _public_calls(x, w1, w2)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert compare_bits(g, w) is None, compare_bits(g, w)


def test_dynamo_reports_zero_graph_breaks():
    explained = torch._dynamo.explain(_public_calls)(*_inputs())
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_graph_calls_the_custom_ops():
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch.compile(_public_calls, fullgraph=True, backend=backend)(*_inputs())
    for op in ("megatron_qat.fake_quantize", "megatron_qat.quantize", "megatron_qat.fake_quantize_many"):
        assert any(t.startswith(op) for t in seen), (op, seen)


def test_nonfinite_blocks_stay_nan_under_compile():
    x = _x((2, 128), family="nan_inf_blocks")
    got = torch.compile(mxfp4.fake_quantize, fullgraph=True, backend="aot_eager")(x)
    assert compare_bits(got, mxfp4.fake_quantize(x)) is None


def test_grouped_quantizer_compiles_with_fullgraph():
    q = mxfp4.GroupedFakeQuantizer(32)
    ws = [_x((8, 64), seed=3), _x((8, 64), seed=4)]
    got = torch.compile(lambda a, b: q([a, b]), fullgraph=True, backend="aot_eager")(*ws)
    for g, w in zip(got, mxfp4.fake_quantize_many(ws)):
        assert g.shape == w.shape and compare_bits(g, w) is None


def test_fake_quantize_ste_under_compile_has_identity_backward():
    w = _x((4, 64), family="random_1").requires_grad_(True)
    upstream = torch.randn(4, 64).to(torch.bfloat16)

    def loss(w):
        return (mxfp4.fake_quantize_ste(w) * upstream).sum()

    torch.compile(loss, fullgraph=True, backend="aot_eager")(w).backward()
    assert torch.equal(w.grad.view(torch.int16), upstream.view(torch.int16))
    out = torch.compile(mxfp4.fake_quantize_ste, fullgraph=True, backend="aot_eager")(w)
    assert compare_bits(out.detach(), mxfp4.fake_quantize(w.detach())) is None


def test_ops_called_directly_equal_the_eager_api():
    x = _x()
    assert compare_bits(OPS.fake_quantize(x, 32, None), mxfp4.fake_quantize(x)) is None
    codes, scales = OPS.quantize(x, 32, "reference")
    ref_codes, ref_scales = mxfp4.quantize(x)
    assert compare_bits(codes, ref_codes) is None and compare_bits(scales, ref_scales) is None
    flat = OPS.fake_quantize_many([x, x[1]], 32, None)
    assert compare_bits(flat, torch.cat([mxfp4.fake_quantize(x).reshape(-1), mxfp4.fake_quantize(x[1]).reshape(-1)])) is None


def test_ops_run_the_triton_kernel_when_asked():
    require("triton", "the triton extra is not installed")
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter check; tests/gpu covers CUDA")
    x = _x((2, 64))
    assert compare_bits(OPS.fake_quantize(x, 32, "triton"), mxfp4.fake_quantize(x, impl="reference")) is None
    flat = OPS.fake_quantize_many([x, x], 32, "triton")
    assert compare_bits(flat.view(2, 2, 64)[1], mxfp4.fake_quantize(x, impl="reference")) is None


def test_fake_kernels_validate_like_eager():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 5, 64, dtype=torch.bfloat16)
        assert OPS.fake_quantize(x, 32, None).shape == (3, 5, 64)
        codes, scales = OPS.quantize(x, 32, None)
        assert (codes.shape, scales.shape, codes.dtype) == ((3, 5, 32), (3, 5, 2), torch.uint8)
        assert OPS.fake_quantize_many([x, x[0]], 32, None).shape == (3 * 5 * 64 + 5 * 64,)
        with pytest.raises(ValueError, match="not a multiple of the MXFP4 block size 32"):
            OPS.fake_quantize(torch.empty(2, 48, dtype=torch.bfloat16), 32, None)
        with pytest.raises(ValueError, match=r"xs\[1\] is torch.float16"):
            OPS.fake_quantize_many([x, torch.empty(2, 32, dtype=torch.float16)], 32, None)


@pytest.mark.parametrize(
    "name, args",
    [
        ("fake_quantize", lambda: (_x((4, 64)), 32, None)),
        ("quantize", lambda: (_x((4, 64)), 32, None)),
        ("fake_quantize_many", lambda: ([_x((4, 64)), _x((2, 32), seed=1)], 32, None)),
        ("fake_quantize_ste", lambda: (_x((4, 64)).requires_grad_(True), 32, None)),
    ],
)
def test_opcheck(name, args):
    torch.library.opcheck(getattr(OPS, name).default, args())


# --- issue 15: a non-default rule and the activation op ---------------------------------------------
def _rule_calls(x, w1, w2):
    fq8 = mxfp4.fake_quantize(x, rule=mxfp4.FLASHINFER_MXFP8)
    codes, scales = mxfp4.quantize(x, rule=mxfp4.VLLM_ONLINE_MXFP4)
    many = mxfp4.fake_quantize_many([w1, w2], rule=mxfp4.TIES_DOWN_MXFP4)
    act = mxfp4.fake_quantize_activation(w1, mxfp4.FLASHINFER_MXFP8)
    act4 = mxfp4.fake_quantize_activation(w2, mxfp4.FLASHINFER_MXFP4)
    return fq8, codes, scales, many[0], many[1], act, act4


def test_rules_and_activation_compile_with_fullgraph_and_match_eager_bits():
    x, w1, w2 = _inputs()
    got = torch.compile(_rule_calls, fullgraph=True, backend="aot_eager")(x, w1, w2)
    want = _rule_calls(x, w1, w2)
    for g, w in zip(got, want):
        assert compare_bits(g, w) is None, compare_bits(g, w)
    explained = torch._dynamo.explain(_rule_calls)(x, w1, w2)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_compiled_graph_calls_the_activation_op_with_the_rule_name():
    seen = []

    def backend(gm, example_inputs):
        seen.extend((str(n.target), n.args) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch.compile(_rule_calls, fullgraph=True, backend=backend)(*_inputs())
    acts = [args for target, args in seen if target.startswith("megatron_qat.fake_quantize_activation")]
    assert [a[1] for a in acts] == ["flashinfer-mxfp8", "flashinfer-mxfp4"]
    assert any(t.startswith("megatron_qat.quantize") and "vllm-online-mxfp4" in a for t, a in seen)


def test_activation_op_under_compile_has_identity_backward():
    x = _x((4, 64), family="random_1").requires_grad_(True)
    upstream = torch.randn(4, 64).to(torch.bfloat16)

    def loss(x):
        return (mxfp4.fake_quantize_activation(x, mxfp4.FLASHINFER_MXFP8) * upstream).sum()

    torch.compile(loss, fullgraph=True, backend="aot_eager")(x).backward()
    assert torch.equal(x.grad.view(torch.int16), upstream.view(torch.int16))


@pytest.mark.parametrize(
    "name, args",
    [
        ("fake_quantize", lambda: (_x((4, 64)), 32, None, "flashinfer-mxfp8")),
        ("quantize", lambda: (_x((4, 64)), 32, None, "flashinfer-mxfp8")),
        ("fake_quantize_many", lambda: ([_x((4, 64)), _x((2, 32), seed=1)], 32, None, "vllm-online-mxfp4")),
        ("fake_quantize_ste", lambda: (_x((4, 64)).requires_grad_(True), 32, None, "ties-down-mxfp4")),
        ("fake_quantize_activation", lambda: (_x((4, 64)).requires_grad_(True), "flashinfer-mxfp8", 32, None)),
        ("fake_quantize_activation", lambda: (_x((8, 96)), "flashinfer-mxfp4", 32, None)),
    ],
)
def test_opcheck_rules(name, args):
    torch.library.opcheck(getattr(OPS, name).default, args())


def test_fake_kernels_of_rules():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 5, 64, dtype=torch.bfloat16)
        codes, scales = OPS.quantize(x, 32, None, "flashinfer-mxfp8")
        assert (codes.shape, scales.shape) == ((3, 5, 64), (3, 5, 2))
        assert OPS.fake_quantize_activation(x, "flashinfer-mxfp8", 32, None).shape == (3, 5, 64)
        with pytest.raises(ValueError, match="unknown quantization rule 'nope'"):
            OPS.fake_quantize_activation(x, "nope", 32, None)
        with pytest.raises(ValueError, match="not a multiple of the MXFP4 block size 32"):
            OPS.fake_quantize_activation(torch.empty(4, 48, dtype=torch.bfloat16), "flashinfer-mxfp8", 32, None)
