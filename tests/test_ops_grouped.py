"""The op layer's grouped entry points and edges (issues 8 and 9):

- :class:`mxfp4.GroupedFakeQuantizer` keeps the grouped kernel's pointer table with its owner,
  rebuilds it only when the tensors change, never during CUDA graph capture (capture is simulated
  here on CPU; tests/gpu/test_grouped_cuda_graph.py captures a real graph);
- :func:`mxfp4.quantize_many` (codes + scales for the export);
- no host read-back (``.item()``) and no tensor built from host data (an H2D copy on CUDA) on the
  fake-quant path;
- the reference and the Triton kernel (CPU interpreter, tiny shapes) agree on empty tensors, zero
  rows, mixed-dtype groups and non-finite input.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _helpers import require
from megatron_qat import mxfp4
from megatron_qat.numerics.families import compare_bits, make
from megatron_qat.numerics.reference import fake_quantize_reference, quantize_reference

IMPLS = ("reference", "triton")


def _need(impl):
    if impl == "triton":
        require("triton", "the triton extra is not installed")
        if torch.cuda.is_available():
            pytest.skip("CPU interpreter check; tests/gpu covers CUDA")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("MEGATRON_QAT_KERNEL", raising=False)


def _experts(n=3, rows=4, k=64, dtype=torch.bfloat16):
    return [make("random_bits", (rows, k), dtype, seed=i) for i in range(n)]


# --- GroupedFakeQuantizer -----------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_quantizer_equals_fake_quantize_many(impl):
    _need(impl)
    ws = _experts() + [make("nan_inf_blocks", (2, 96), torch.bfloat16), torch.empty(0, 64, dtype=torch.bfloat16)]
    q = mxfp4.GroupedFakeQuantizer(32, impl=impl)
    for _ in range(2):
        outs = q(ws)
        assert len(outs) == len(ws)
        for out, w in zip(outs, ws):
            assert out.shape == w.shape and compare_bits(out, fake_quantize_reference(w)) is None
    assert q([]) == []


def test_quantizer_table_is_built_once_and_rebuilt_only_on_change():
    _need("triton")
    ws = _experts()
    q = mxfp4.GroupedFakeQuantizer(32, impl="triton")
    assert q.table_builds == 0
    for _ in range(3):
        q(ws)
    assert q.table_builds == 1
    ws[1] = ws[1].clone()  # a new storage for one expert (e.g. a reallocated parameter)
    assert compare_bits(q(ws)[1], fake_quantize_reference(ws[1])) is None
    assert q.table_builds == 2
    q(ws)
    assert q.table_builds == 2
    q([w.float() for w in ws])  # dtype changed
    assert q.table_builds == 3


def test_each_quantizer_holds_its_own_table_and_frees_it_with_itself():
    """No global cache (issue 9: a 64-entry global LRU thrashed past 32 MoE layers and could free
    a table a CUDA graph still used): each owner builds and keeps its own table, even for the same
    weights, and the table dies with its owner."""
    import gc
    import weakref

    _need("triton")
    ws = _experts(2, rows=2, k=32)
    quantizers = [mxfp4.GroupedFakeQuantizer(32, impl="triton") for _ in range(3)]
    for _ in range(2):
        for q in quantizers:
            q(ws)
    assert [q.table_builds for q in quantizers] == [1, 1, 1]
    tables = {id(q._tables.current.table) for q in quantizers}
    assert len(tables) == 3
    table = weakref.ref(quantizers[0]._tables.current.table)
    del quantizers[0], q
    gc.collect()
    assert table() is None


def test_quantizer_refuses_bad_arguments():
    with pytest.raises(ValueError, match="positive even integer"):
        mxfp4.GroupedFakeQuantizer(7)
    q = mxfp4.GroupedFakeQuantizer(32)
    with pytest.raises(TypeError, match="must be a list of tensors, got one torch.Tensor"):
        q(torch.zeros(2, 32))
    with pytest.raises(ValueError, match=r"xs\[1\] is torch.float16.*one dtype"):
        q([torch.zeros(2, 32, dtype=torch.bfloat16), torch.zeros(2, 32, dtype=torch.float16)])


# --- CUDA graph capture rules (capture simulated) -----------------------------------------------
@pytest.fixture
def capturing(monkeypatch):
    """Make the kernel host code believe a CUDA graph capture is in progress."""
    require("triton", "the triton extra is not installed")
    from megatron_qat.kernels import triton_qdq

    state = {"on": False}
    monkeypatch.setattr(triton_qdq, "_capturing", lambda x: state["on"])
    return state


def test_warmed_quantizer_replays_without_building_during_capture(capturing):
    _need("triton")
    ws = _experts()
    q = mxfp4.GroupedFakeQuantizer(32, impl="triton")
    eager = q(ws)  # warm-up
    capturing["on"] = True
    captured = q(ws)
    assert q.table_builds == 1
    assert all(compare_bits(a, b) is None for a, b in zip(captured, eager))


def test_cold_quantizer_refuses_to_build_during_capture(capturing):
    _need("triton")
    capturing["on"] = True
    with pytest.raises(RuntimeError, match=r"not allowed during CUDA graph capture.*one eager forward \(warm-up\)"):
        mxfp4.GroupedFakeQuantizer(32, impl="triton")(_experts())


def test_plain_grouped_call_refuses_capture(capturing):
    _need("triton")
    capturing["on"] = True
    with pytest.raises(RuntimeError, match=r"without a GroupedFakeQuantizer.*GroupedFakeQuantizer \(one per module\)"):
        mxfp4.fake_quantize_many(_experts(), impl="triton")


def test_a_table_read_by_a_captured_graph_outlives_a_rebuild(capturing):
    _need("triton")
    ws = _experts()
    q = mxfp4.GroupedFakeQuantizer(32, impl="triton")
    q(ws)
    capturing["on"] = True
    q(ws)  # "captured": the graph now points at this table
    captured_table = q._tables.current
    capturing["on"] = False
    q([w.clone() for w in ws])  # weights moved: a new table, the captured one is kept
    assert q._tables.current is not captured_table
    assert q._tables.graph_tables == [captured_table]


# --- quantize_many ----------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_quantize_many_matches_quantize(impl):
    _need(impl)
    ws = _experts(2) + [make("ties", (3, 96), torch.bfloat16), make("subnormal", (1, 32), torch.bfloat16)]
    pairs = mxfp4.quantize_many(ws, 32, impl=impl)
    assert len(pairs) == len(ws)
    for (codes, scales), w in zip(pairs, ws):
        ref_codes, ref_scales = quantize_reference(w)
        assert compare_bits(codes, ref_codes) is None and compare_bits(scales, ref_scales) is None
    assert mxfp4.quantize_many([], impl=impl) == []


@pytest.mark.parametrize("impl", IMPLS)
def test_quantize_many_names_the_non_finite_tensor(impl):
    _need(impl)
    ws = _experts(3)
    ws[2] = ws[2].clone()
    ws[2][1, 5] = float("inf")
    with pytest.raises(ValueError, match=r"xs\[2\] of shape \(4, 64\) holds 1 non-finite value\(s\) \(first at index \(1, 5\)"):
        mxfp4.quantize_many(ws, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("call", ["fake_quantize_many", "quantize_many"])
def test_groups_refuse_mixed_dtypes_in_both_impls(impl, call):
    _need(impl)
    xs = [torch.zeros(2, 32, dtype=torch.bfloat16), torch.zeros(2, 32, dtype=torch.float16)]
    with pytest.raises(ValueError, match=r"xs\[1\] is torch.float16 on cpu but xs\[0\] is torch.bfloat16"):
        getattr(mxfp4, call)(xs, impl=impl)


# --- empty tensors: both implementations agree (issue 8) ---------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(4, 0), (0, 64), (0, 0), (2, 0, 32)], ids=str)
def test_empty_tensors(impl, shape):
    _need(impl)
    x = torch.empty(shape, dtype=torch.bfloat16)
    lead, k = shape[:-1], shape[-1]
    codes, scales = mxfp4.quantize(x, impl=impl)
    assert (codes.shape, scales.shape) == ((*lead, k // 2), (*lead, k // 32))
    assert codes.dtype == scales.dtype == torch.uint8
    fq = mxfp4.fake_quantize(x, impl=impl)
    assert fq.shape == shape and fq.dtype == x.dtype and fq.numel() == 0
    assert mxfp4.dequantize(codes, scales).shape == shape
    assert [t.shape for t in mxfp4.fake_quantize_many([x, x], impl=impl)] == [shape, shape]
    assert [(c.shape, s.shape) for c, s in mxfp4.quantize_many([x], impl=impl)] == [(codes.shape, scales.shape)]


# --- no host read-back, no tensor from host data on the fake-quant path (issue 9) --------------------
class _RefuseHostTraffic(TorchDispatchMode):
    """``_local_scalar_dense`` is what ``.item()`` / ``bool(t)`` / ``int(t)`` run (a device->host
    sync on CUDA); ``lift_fresh`` is what ``torch.tensor(python data)`` runs (a host->device copy
    on CUDA, illegal during graph capture)."""

    REFUSED = ("aten._local_scalar_dense", "aten.lift_fresh", "aten.item")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.REFUSED):
            raise AssertionError(f"host traffic on the fake-quant path: {func}")
        return func(*args, **(kwargs or {}))


def test_fake_quant_path_reads_nothing_back_and_copies_nothing_in():
    w = make("nan_inf_blocks", (4, 64), torch.bfloat16)
    ws = _experts(2)
    q = mxfp4.GroupedFakeQuantizer(32, impl="reference")
    leaf = w.clone().requires_grad_(True)
    with _RefuseHostTraffic():
        mxfp4.fake_quantize(w, impl="reference")
        mxfp4.fake_quantize_many(ws, impl="reference")
        q(ws)
        out = mxfp4.fake_quantize_ste(leaf, impl="reference")
        out.backward(torch.ones_like(out))
    with pytest.raises(AssertionError, match="host traffic"), _RefuseHostTraffic():
        mxfp4.quantize(ws[0], impl="reference")  # its non-finite check does read one bool back
