"""CUDA graph capture of the grouped MXFP4 fake-quant (issue 9, lean hot path): a warmed-up
:class:`mxfp4.GroupedFakeQuantizer` is captured in a ``torch.cuda.graph`` and its replay is bit
identical to the eager call (int16 views), with no host-to-device copy after the warm-up; a cold
one refuses capture with a message; the reference path is capturable too.

Run on the lent GPU: ``python -m pytest -q tests/gpu/test_grouped_cuda_graph.py`` (skipped on a
machine without CUDA: the ``gpu`` marker, tests/conftest.py).
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")]

from _helpers import bits, require  # noqa: E402

require("triton", "the triton extra is not installed (pip install -e '.[triton]')")

from megatron_qat import mxfp4  # noqa: E402
from megatron_qat.numerics.families import ALL_FAMILIES, compare_bits, make  # noqa: E402
from megatron_qat.numerics.reference import fake_quantize_reference  # noqa: E402


def _experts(n=8, rows=512, k=2048, dtype=torch.bfloat16):
    return [make(ALL_FAMILIES[i % len(ALL_FAMILIES)], (rows - 32 * (i % 3), k), dtype, seed=i).cuda() for i in range(n)]


def _warm_up(fn):
    """Eager call on a side stream, as torch.cuda.graph's documentation asks before capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_captured_grouped_fake_quant_replays_bit_identical_to_eager(dtype):
    ws = _experts(dtype=dtype)
    q = mxfp4.GroupedFakeQuantizer(32, impl="triton")
    eager = [o.clone() for o in _warm_up(lambda: q(ws))]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = q(ws)
    assert q.table_builds == 1  # the capture reused the warm-up's table
    graph.replay()
    torch.cuda.synchronize()
    for i, (out, ref, w) in enumerate(zip(static_out, eager, ws)):
        assert torch.equal(bits(out), bits(ref)), f"expert {i}"
        assert compare_bits(out, fake_quantize_reference(w)) is None, f"expert {i}"
    # the optimizer updates weights in place (same pointers): the next replay sees the new values
    with torch.no_grad():
        for w in ws:
            w.mul_(-2)
    graph.replay()
    torch.cuda.synchronize()
    for i, (out, w) in enumerate(zip(static_out, ws)):
        assert compare_bits(out, fake_quantize_reference(w)) is None, f"expert {i} after the update"


def test_warmed_quantizer_makes_no_host_to_device_copy():
    ws = _experts(4)
    q = mxfp4.GroupedFakeQuantizer(32, impl="triton")
    _warm_up(lambda: q(ws))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        q(ws)
        torch.cuda.synchronize()
    copies = [e.name for e in prof.events() if "HtoD" in e.name or "Memcpy H" in e.name]
    assert copies == [], copies
    torch.cuda.set_sync_debug_mode("error")
    try:
        q(ws)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cold_quantizer_refuses_capture_with_a_warm_up_message():
    ws = _experts(2)
    q = mxfp4.GroupedFakeQuantizer(32, impl="triton")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=r"not allowed during CUDA graph capture.*one eager forward \(warm-up\)"):
        with torch.cuda.graph(graph):
            q(ws)
    assert q.table_builds == 0


def test_plain_fake_quantize_many_refuses_capture():
    ws = _experts(2)
    _warm_up(lambda: mxfp4.fake_quantize_many(ws, impl="triton"))
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="without a GroupedFakeQuantizer"):
        with torch.cuda.graph(graph):
            mxfp4.fake_quantize_many(ws, impl="triton")


@pytest.mark.parametrize("impl", ("triton", "reference"))
def test_single_tensor_fake_quant_is_capturable(impl):
    x = make("nan_inf_blocks", (4, 256, 2048), torch.bfloat16).cuda()
    eager = _warm_up(lambda: mxfp4.fake_quantize(x, impl=impl)).clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = mxfp4.fake_quantize(x, impl=impl)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(bits(static_out), bits(eager))


def _count_direct_launches(monkeypatch) -> list:
    """Count the prepared direct launches (CompiledLaunch calls): a CUDA-graph replay makes none."""
    from megatron_qat.kernels import prepared

    calls = []
    real = prepared.CompiledLaunch.__call__
    monkeypatch.setattr(prepared.CompiledLaunch, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    return calls


def _check(outs, ws, what):
    torch.cuda.synchronize()
    for i, (out, w) in enumerate(zip(outs, ws)):
        assert compare_bits(out, fake_quantize_reference(w)) is None, f"expert {i}, {what}"


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_refill_replays_a_captured_launch_and_sees_in_place_updates(dtype, monkeypatch):
    """Issue 14 (host time of a miss): ``quantize_into`` (the cache's refill after an optimizer step)
    captures its launch once per output address and then replays it: the kernel is launched directly
    once (inside the capture), every refill equals the reference on the updated weights."""
    ws = _experts(dtype=dtype)
    q = mxfp4.GroupedFakeQuantizer(32, impl="triton")
    outs = q(ws)
    launches = _count_direct_launches(monkeypatch)
    for step in range(4):
        with torch.no_grad():
            for w in ws:
                w.mul_(-1.5)  # an optimizer step: in place, same pointers
        assert q.quantize_into(ws, outs)
        _check(outs, ws, f"refill {step}")
    assert len(launches) == 1  # the capture; the other refills were replays


def test_refill_into_a_reallocated_output_captures_again(monkeypatch):
    """A copy whose memory was freed and allocated again (the cache frees an unheld copy at a step)
    lands at another address: the old graph is not replayed into it; a new one is captured."""
    ws = _experts(4)
    q = mxfp4.GroupedFakeQuantizer(32, impl="triton")
    outs = q(ws)
    assert q.quantize_into(ws, outs)
    launches = _count_direct_launches(monkeypatch)
    storage = outs[0]._base.untyped_storage()
    nbytes, before = storage.nbytes(), storage.data_ptr()
    storage.resize_(0)
    blocker = torch.empty(nbytes, dtype=torch.uint8, device="cuda")  # takes the freed block
    storage.resize_(nbytes)
    assert storage.data_ptr() != before
    with torch.no_grad():
        for w in ws:
            w.add_(0.25)
    assert q.quantize_into(ws, outs)
    _check(outs, ws, "after the re-allocation")
    assert len(launches) == 1
    assert q.quantize_into(ws, outs) and len(launches) == 1  # replayed at the new address
    del blocker


def test_refill_inside_an_enclosing_capture_is_captured_by_the_caller():
    """Under a caller's capture the refill launches directly (its launch joins the caller's graph),
    never replays its own graph inside another capture."""
    ws = _experts(4)
    q = mxfp4.GroupedFakeQuantizer(32, impl="triton")
    outs = _warm_up(lambda: q(ws))
    assert q.quantize_into(ws, outs)  # captures the refill's own graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        assert q.quantize_into(ws, outs)
    with torch.no_grad():
        for w in ws:
            w.mul_(3)
    graph.replay()
    _check(outs, ws, "the caller's replay")
