"""GPU: the Triton statistics kernel (megatron_qat.kernels.triton_stats) at real per-rank expert
shapes against the torch pass on the same GPU, its determinism, no host synchronisation, and CUDA
graph capture of a warmed-up :class:`block_stats.GroupedStats`.

Run on the lent GPU: ``python -m pytest -q tests/gpu/test_metrics_kernel_gpu.py`` (skipped on a
machine without CUDA: the ``gpu`` marker, tests/conftest.py). tests/test_metrics_kernel.py and
tests/test_metrics_values.py run on CUDA too when a GPU is present.
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")]

from _helpers import require  # noqa: E402

require("triton", "the triton extra is not installed (pip install -e '.[triton]')")

from megatron_qat.metrics import block_stats  # noqa: E402
from megatron_qat.numerics import families  # noqa: E402
from megatron_qat.numerics.rules import FLASHINFER_MXFP4, TIES_DOWN_MXFP4, VLLM_ONLINE_MXFP4  # noqa: E402

# per-rank [experts, out, in] of benchmarks/bench_qdq.py (Qwen3-30B-A3B fc1 at EP=8, DeepSeek-V3 fc2 at EP=32)
SHAPES = [(16, 1536, 2048), (8, 7168, 2048)]
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
RULES = (FLASHINFER_MXFP4, VLLM_ONLINE_MXFP4, TIES_DOWN_MXFP4)


def _experts(shape, dtype, seed=0):
    """Gaussian weights (std 0.02, finite sums) with a non-finite block and, where the dtype can
    make one (bf16, fp32), a flushed block that is not all zero."""
    e, n, k = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(shape, device="cuda", generator=g) * 0.02).to(dtype)
    w[e - 1, 100, 64:96] = 0
    if dtype != torch.float16:
        w[e - 1, 100, 70] = 2.0**-125  # amax * RN(1/6) subnormal: scale byte 0
    w[e - 1, 101, 3] = float("nan")
    return list(w.unbind(0))


def _adversarial_experts(dtype, rows=256, k=2048):
    """One adversarial input family per expert (sums may be +inf: the maxima family)."""
    return [families.make(f, (rows, k), dtype, seed=i).cuda() for i, f in enumerate(families.ALL_FAMILIES)]


def _assert_same(ker, ref):
    assert torch.equal(ker.counts, ref.counts), (ker.counts.tolist(), ref.counts.tolist())
    assert torch.equal(ker.scale_hist, ref.scale_hist)
    assert torch.equal(ker.nonfinite_per_expert, ref.nonfinite_per_expert)
    assert ker.sums.tolist() == pytest.approx(ref.sums.tolist(), rel=1e-12, abs=0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_equals_the_torch_pass_at_real_shapes(shape, dtype):
    ws = _experts(shape, dtype)
    ker = block_stats.measure(ws, 32, impl="triton")
    ref = block_stats.measure(ws, 32, impl="reference")
    _assert_same(ker, ref)
    assert ker.nonfinite_per_expert.tolist()[-1] == 1 and int(ker.counts[3]) == (dtype != torch.float16)
    assert all(v < float("inf") for v in ker.sums.tolist())


@pytest.mark.parametrize("rule", RULES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_equals_the_torch_pass_on_every_family(dtype, rule):
    ws = _adversarial_experts(dtype)
    ker = block_stats.measure(ws, 32, rule=rule, impl="triton")
    _assert_same(ker, block_stats.measure(ws, 32, rule=rule, impl="reference"))


def test_sums_are_deterministic_run_to_run():
    ws = _experts(SHAPES[0], torch.bfloat16, seed=1)
    meter = block_stats.GroupedStats(32, impl="triton")
    runs = [meter(ws) for _ in range(3)] + [block_stats.measure(ws, 32, impl="triton")]
    for r in runs[1:]:
        assert torch.equal(r.sums.view(torch.int64), runs[0].sums.view(torch.int64))
        assert torch.equal(r.counts, runs[0].counts) and torch.equal(r.scale_hist, runs[0].scale_hist)


def _warm_up(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    return out


def test_no_host_sync_and_no_copy_once_warm():
    ws = _experts((4, 512, 2048), torch.bfloat16)
    meter = block_stats.GroupedStats(32, impl="triton")
    torch.cuda.set_sync_debug_mode("error")
    try:
        block_stats.measure(ws, 32, impl="triton")  # cold: a pinned, non-blocking table copy, no sync
        meter(ws)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        meter(ws)
        torch.cuda.synchronize()
    copies = [e.name for e in prof.events() if "HtoD" in e.name or "Memcpy H" in e.name]
    assert copies == [] and meter.table_builds == 1, copies


def test_warm_grouped_stats_is_capturable_and_replays_the_weights_of_the_moment():
    ws = _experts((4, 512, 2048), torch.bfloat16)
    meter = block_stats.GroupedStats(32, impl="triton")
    _warm_up(lambda: meter(ws))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = meter(ws)
    assert meter.table_builds == 1
    graph.replay()
    torch.cuda.synchronize()
    _assert_same(static, block_stats.measure(ws, 32, impl="reference"))
    with torch.no_grad():  # an optimizer step updates in place: same pointers, new values
        for w in ws:
            w.mul_(-3)
    graph.replay()
    torch.cuda.synchronize()
    _assert_same(static, block_stats.measure(ws, 32, impl="reference"))


def test_cold_grouped_stats_refuses_capture():
    ws = _experts((2, 256, 2048), torch.bfloat16)
    meter = block_stats.GroupedStats(32, impl="triton")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="not allowed during CUDA graph capture.*before capturing"):
        with torch.cuda.graph(graph):
            meter(ws)
    assert meter.table_builds == 0
