"""Issues 14 and 15: the activation QDQ (:func:`mxfp4.fake_quantize_activation`) and the prepared
launches of the hot path (:mod:`megatron_qat.kernels.prepared`), on CPU.

- the activation call equals the reference of its rule, bit for bit, in both implementations
  (Triton in its interpreter), with an identity backward, clear errors and no host traffic;
- a warmed-up :class:`mxfp4.GroupedFakeQuantizer` called with the same tensors re-validates and
  re-derives nothing, and every change of the key (pointer, shape, dtype, contiguity) prepares again;
- :class:`CompiledLaunch` refuses a Triton whose launch API it was not written for (fail closed) and
  calls a triton-3.6-shaped compiled kernel with the argument order read in triton 3.6's jit.py
  (a stand-in object here; tests/gpu/test_rules_gpu.py launches real ones).
"""

import pytest
import torch

from _helpers import require
from megatron_qat import mxfp4
from megatron_qat.numerics.families import compare_bits, make
from megatron_qat.numerics.reference import fake_quantize_reference
from test_ops_grouped import _RefuseHostTraffic

RULES = tuple(mxfp4.RULES.values())
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FAMILIES = ("random_1", "e4m3_ties", "subnormal", "nan_inf_blocks", "zeros_negzero", "maxima")


def _need_triton():
    require("triton", "the triton extra is not installed")
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter check; tests/gpu covers CUDA")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("MEGATRON_QAT_KERNEL", raising=False)


@pytest.mark.parametrize("impl", ("reference", "triton"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule", RULES, ids=str)
def test_activation_equals_the_reference_of_its_rule(rule, dtype, impl):
    if impl == "triton":
        _need_triton()
    for i, family in enumerate(FAMILIES):
        x = make(family, (6, 64), dtype, seed=i)
        got = mxfp4.fake_quantize_activation(x, rule, impl=impl)
        assert got.shape == x.shape and got.dtype == x.dtype and got.is_contiguous()
        assert compare_bits(got, fake_quantize_reference(x, rule=rule)) is None, (family, compare_bits(got, fake_quantize_reference(x, rule=rule)))


@pytest.mark.parametrize("impl", ("reference", "triton"))
def test_activation_backward_is_the_identity(impl):
    if impl == "triton":
        _need_triton()
    x = make("random_1", (2, 3, 64), torch.bfloat16).requires_grad_(True)
    upstream = make("random_1", (2, 3, 64), torch.bfloat16, seed=1)
    out = mxfp4.fake_quantize_activation(x, mxfp4.FLASHINFER_MXFP8, impl=impl)
    assert out.requires_grad
    (out * upstream).sum().backward()
    assert torch.equal(x.grad.view(torch.int16), upstream.view(torch.int16))
    with torch.no_grad():
        assert not mxfp4.fake_quantize_activation(x, mxfp4.FLASHINFER_MXFP8, impl=impl).requires_grad


def test_activation_non_contiguous_input_is_quantized_as_its_contiguous_copy():
    base = make("random_extreme", (8, 128), torch.bfloat16)
    x = base[:, ::2]
    got = mxfp4.fake_quantize_activation(x, mxfp4.FLASHINFER_MXFP4)
    assert compare_bits(got, fake_quantize_reference(x.contiguous())) is None and got.is_contiguous()


def test_activation_errors_name_the_tensor():
    with pytest.raises(ValueError, match=r"fc2_input has shape \(4, 48\): its last dim K=48 is not a multiple"):
        mxfp4.fake_quantize_activation(torch.zeros(4, 48, dtype=torch.bfloat16), mxfp4.FLASHINFER_MXFP8, name="fc2_input")
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        mxfp4.fake_quantize_activation(torch.zeros(4, 32, dtype=torch.float64), mxfp4.FLASHINFER_MXFP8)
    with pytest.raises(TypeError, match="rule must be a megatron_qat.numerics.rules.Rule"):
        mxfp4.fake_quantize_activation(torch.zeros(4, 32), "flashinfer-mxfp8")
    with pytest.raises(ValueError, match="positive even integer"):
        mxfp4.fake_quantize_activation(torch.zeros(4, 32), mxfp4.FLASHINFER_MXFP8, 7)


def test_activation_reads_nothing_back_and_copies_nothing_in():
    x = make("nan_inf_blocks", (4, 64), torch.bfloat16).requires_grad_(True)
    with _RefuseHostTraffic():
        out = mxfp4.fake_quantize_activation(x, mxfp4.FLASHINFER_MXFP8, impl="reference")
        out.backward(torch.ones_like(out))


# --- the prepared grouped launch --------------------------------------------------------------------
def _experts(n=3, rows=4, k=64, dtype=torch.bfloat16):
    return [make("random_bits", (rows, k), dtype, seed=i) for i in range(n)]


def _count_validation(monkeypatch):
    from megatron_qat.kernels import triton_qdq

    calls = []
    real = triton_qdq.check_group
    monkeypatch.setattr(triton_qdq, "check_group", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_repeated_call_revalidates_nothing_and_matches_the_reference(rule, monkeypatch):
    _need_triton()
    calls = _count_validation(monkeypatch)
    ws = _experts() + [make("nan_inf_blocks", (2, 64), torch.bfloat16)]
    q = mxfp4.GroupedFakeQuantizer(32, impl="triton", rule=rule)
    first = q(ws)
    assert len(calls) == 1 and q.table_builds == 1
    for _ in range(3):
        again = q(ws)
        assert all(compare_bits(a, fake_quantize_reference(w, rule=rule)) is None for a, w in zip(again, ws))
        assert [a.shape for a in again] == [w.shape for w in ws]
    assert len(calls) == 1 and q.table_builds == 1
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(first, again))  # a new output every call


def test_every_key_change_prepares_again(monkeypatch):
    _need_triton()
    calls = _count_validation(monkeypatch)
    ws = _experts()
    q = mxfp4.GroupedFakeQuantizer(32, impl="triton")
    q(ws)
    changes = [
        lambda ws: [ws[0].clone()] + ws[1:],  # a new pointer
        lambda ws: [ws[0].view(2, 128)] + ws[1:],  # same pointer and size, another shape
        lambda ws: [ws[0].view(torch.float16)] + ws[1:],  # same pointer, another dtype (refused: mixed dtypes)
        lambda ws: [ws[0].t()] + ws[1:],  # same pointer, not contiguous (refused: K % 32)
        lambda ws: ws[:2],  # fewer tensors
    ]
    for n, change in enumerate(changes, start=2):
        new = change(ws)
        try:
            outs = q(new)
        except ValueError:
            assert len(calls) == n  # validated, and refused
            continue
        assert len(calls) == n
        for out, w in zip(outs, new):
            assert out.shape == w.shape and compare_bits(out, fake_quantize_reference(w)) is None


def test_reference_quantizer_keeps_nothing_prepared():
    ws = _experts()
    q = mxfp4.GroupedFakeQuantizer(32, impl="reference", rule=mxfp4.VLLM_ONLINE_MXFP4)
    for _ in range(2):
        for out, w in zip(q(ws), ws):
            assert compare_bits(out, fake_quantize_reference(w, rule=mxfp4.VLLM_ONLINE_MXFP4)) is None
    assert q._prepared is None


# --- CompiledLaunch: the triton 3.6 launch, fail closed ----------------------------------------------
class _FakeSrc:
    class fn:
        arg_names = ["a", "b", "N"]


class _FakeCompiled:
    """Shaped like triton 3.6's CompiledKernel: run / function / packed_metadata / src / [grid]."""

    def __init__(self):
        self.calls, self.runner_calls = [], []
        self.src, self.function, self.packed_metadata = _FakeSrc(), 1234, (4, 1, 0)
        self.run = lambda *args: self.calls.append(args)

    def __getitem__(self, grid):
        return lambda *args, stream=None: self.runner_calls.append((grid, args, stream))


def test_compiled_launch_calls_the_36_launcher_in_its_argument_order(monkeypatch):
    triton = require("triton", "the triton extra is not installed")
    from megatron_qat.kernels import prepared

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    fake = _FakeCompiled()
    launch = prepared.CompiledLaunch(fake, ["a", "b", "N"])
    launch(7, 99, 0x1000, 0x2000, 5)
    assert fake.calls == [(7, 1, 1, 99, 1234, (4, 1, 0), None, None, None, 0x1000, 0x2000, 5)]
    hook = lambda metadata: None  # noqa: E731  a profiler's launch hook: the runner must call it
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        launch(3, 99, 1, 2, 3)
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    assert fake.runner_calls == [((3, 1, 1), (1, 2, 3), 99)] and len(fake.calls) == 1


def test_compiled_launch_refuses_other_tritons_and_other_kernels(monkeypatch):
    triton = require("triton", "the triton extra is not installed")
    from megatron_qat.kernels import prepared

    monkeypatch.setattr(triton, "__version__", "3.7.1")
    with pytest.raises(prepared.PreparedLaunchError, match=r"written against triton 3.6 .*triton 3.7.1 is installed"):
        prepared.CompiledLaunch(_FakeCompiled(), ["a", "b", "N"])
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    with pytest.raises(prepared.PreparedLaunchError, match=r"parameters \['a', 'b', 'N'\] != \['x', 'y'\]"):
        prepared.CompiledLaunch(_FakeCompiled(), ["x", "y"])
    broken = _FakeCompiled()
    del broken.packed_metadata
    with pytest.raises(prepared.PreparedLaunchError, match=r"missing \['packed_metadata'\]"):
        prepared.CompiledLaunch(broken, ["a", "b", "N"])
    with pytest.raises(prepared.PreparedLaunchError, match="missing"):
        prepared.CompiledLaunch(None, ["a"])  # the interpreter returns no compiled kernel


def test_activation_launches_reuse_one_compiled_kernel_per_key(monkeypatch):
    """The activation's prepared launch logic with a stand-in compiled kernel (CPU tensors): the first
    call of a key compiles through Triton's ordinary path, later calls of any token count launch the
    handle with the kernel's full argument list, and an unaligned input goes the ordinary way."""
    triton = require("triton", "the triton extra is not installed")
    from megatron_qat.kernels import prepared, qdq_jit

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    ordinary, fakes = [], []

    class _Jit:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                ordinary.append((grid, args[4], kwargs))
                fake = _FakeCompiled()
                fake.src.fn = type("fn", (), {"arg_names": list(prepared._SINGLE_ARGS)})
                fakes.append(fake)
                return fake

            return run

    monkeypatch.setattr(qdq_jit, "qdq_single_kernel", _Jit())
    monkeypatch.setattr(prepared, "_raw_stream", lambda index: 7)
    launches = prepared.ActivationLaunches()
    rule = mxfp4.FLASHINFER_MXFP8
    base = torch.zeros(4096 * 64 + 8, dtype=torch.bfloat16)
    aligned = base[: 4096 * 64].view(4096, 64)
    launches.launch(aligned, torch.empty_like(aligned), 32, rule)
    assert len(ordinary) == 1 and ordinary[0][0] == (64,) and ordinary[0][1] == 8192
    for tokens in (4096, 4093, 17):
        x = base[: tokens * 64].view(tokens, 64)
        out = torch.empty_like(x)
        launches.launch(x, out, 32, rule)
    key = (None, torch.bfloat16, "flashinfer-mxfp8", 32, 128)
    assert list(launches.handles) == [key, (None, torch.bfloat16, "flashinfer-mxfp8", 32, 64)]
    calls = fakes[0].calls
    # (grid0, 1, 1, stream, function, packed_metadata, None x3, x, out, codes=x, scales=x, n_blocks, constexprs...)
    assert [c[0] for c in calls] == [64, 64] and [c[13] for c in calls] == [4096 * 2, 4093 * 2]
    assert calls[0][1:9] == (1, 1, 7, 1234, (4, 1, 0), None, None, None)
    assert calls[0][9] == calls[0][11] == calls[0][12] != calls[0][10]
    assert calls[0][14:] == (0, 32, 32, 128, True, False, 1, 0, 0, False)  # KIND..FTZ (ignored by the launcher)
    unaligned = base[1 : 1 + 4096 * 64].view(4096, 64)
    assert unaligned.data_ptr() % 16
    n_ordinary = len(ordinary)
    launches.launch(unaligned, torch.empty_like(unaligned), 32, rule)
    assert len(ordinary) == n_ordinary + 1 and len(fakes[0].calls) == 2
