"""GPU: a ``torch.cuda.graph`` capture of a PATCHED Megatron ``TEGroupedLinear`` forward+backward
(issue 9 item 2: "a torch.cuda.graph capture of a patched TEGroupedLinear forward+backward replays
bit-identical to eager", "no host-to-device copy and no pinned allocation during capture").

Targets megatron-core 0.19.2 + Transformer Engine 2.20.2 (shared/device/README.md); the module is
the real ``experts.linear_fc1`` / ``linear_fc2`` of a one-GPU ``MoELayer`` built by
``_moe_harness`` (TEGroupedMLP, bf16), called directly as Megatron's ``TEGroupedMLP`` calls it:
``module(x, m_splits)`` with a host list of token counts. NOT run in the session that wrote it
(no GPU was lent).

Design facts checked here (megatron_qat/megatron/cache.py, "a CUDA-graph capture in progress":
nothing is cached):

- the eager warm-up (on a side stream, as torch.cuda.graph's documentation asks) fills the
  module's cache and builds its ``GroupedFakeQuantizer`` table;
- during capture the hook takes the UNCACHED path: the grouped fake-quantize kernel is recorded
  INTO the graph, reading the master weights at their addresses; the module's eager cached copy is
  left untouched; no host-to-device copy or pinned allocation is issued (a dispatch mode sees every
  torch op; TE's own C++ work would fail the capture itself if it copied from pageable host memory);
- the replay's output, input gradient and the experts' ``.grad`` (fusion off) or ``main_grad``
  (gradient-accumulation fusion) equal an eager run bit for bit (int16 / int32 views);
- consequence: after an IN-PLACE update of the master weights (a torch optimizer step) the next
  replay fake-quantizes the NEW weights -- equal to an eager run after the update and different
  from before it. A captured graph re-runs the QDQ on every replay (no per-step reuse inside a
  graph). Replacing a Parameter or its storage (``.data =``, ``load_state_dict(assign=True)``,
  ``.to()``) is not seen by a captured graph: re-capture (docs/usage.md, "CUDA graphs").
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.megatron]


sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root
import _moe_harness as H  # noqa: E402
from _helpers import bits  # noqa: E402

H.require_gpu_stack()
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import megatron_qat  # noqa: E402
from megatron_qat import mxfp4  # noqa: E402
from megatron_qat.megatron import current  # noqa: E402
from megatron_qat.megatron.cache import STATE_ATTR  # noqa: E402

SPLITS = [16, 8, 24, 16]  # tokens per local expert (H.EXPERTS == 4), a host list as TEGroupedMLP passes
assert len(SPLITS) == H.EXPERTS


@pytest.fixture(scope="module", autouse=True)
def _gpu_session(megatron_gpu):
    yield


@pytest.fixture(autouse=True)
def _patched(monkeypatch):
    monkeypatch.setenv("MEGATRON_QAT_METRICS_INTERVAL", "0")  # no statistics pass inside the capture
    monkeypatch.delenv("MEGATRON_QAT_CACHE", raising=False)
    megatron_qat.enable(32)
    yield
    megatron_qat.disable()


class _HostToDeviceWatch(TorchDispatchMode):
    """Records every torch op that moves host data to the GPU or pins host memory."""

    PIN = {"pin_memory", "_pin_memory"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        out = func(*args, **kwargs)
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outputs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        host_in = any(t.device.type == "cpu" and t.dim() > 0 for t in inputs)
        gpu_out = any(t.is_cuda for t in outputs) or any(t.is_cuda for t in inputs if name.endswith("_"))
        if name in self.PIN or kwargs.get("pin_memory") or (host_in and gpu_out):
            self.seen.append(str(func))
        return out


def _module(which: str, fusion: bool):
    config = H.make_config(fusion=fusion)
    layer = H.build_moe_layer(config)
    module = getattr(layer.experts, which)
    params = [module.get_parameter(f"weight{i}") for i in range(module.num_gemms)]
    if fusion:  # what Megatron DDP sets; TE accumulates the wgrad into main_grad itself
        for p in params:
            p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            p.grad_added_to_main_grad = False
    return layer, module, params


def _inputs(module, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(sum(SPLITS), module.in_features, device="cuda", dtype=torch.bfloat16, generator=gen)
    out_features = module.out_features
    dy = torch.randn(sum(SPLITS), out_features, device="cuda", dtype=torch.bfloat16, generator=gen)
    return x.requires_grad_(True), dy


def _step(module, x, dy):
    out = module(x, SPLITS)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(dy)
    return out


def _grads(params, fusion):
    return [(p.main_grad if fusion else p.grad).clone() for p in params]


def _reset_grads(params, fusion):
    for p in params:
        if fusion:
            p.main_grad.zero_()
            p.grad_added_to_main_grad = False
        p.grad = None


def _eager(module, params, x, dy, fusion):
    """One eager forward+backward of the patched module (the graph's static tensors are left alone)."""
    saved = [p.grad for p in params]
    saved_main = [p.main_grad.clone() for p in params] if fusion else None
    x_grad = x.grad
    _reset_grads(params, fusion)
    x.grad = None
    out = _step(module, x, dy).detach().clone()
    want = (out, x.grad.clone(), _grads(params, fusion))
    for p, g in zip(params, saved):
        p.grad = g
    if fusion:
        for p, m in zip(params, saved_main):
            p.main_grad.copy_(m)
    x.grad = x_grad
    return want


def _assert_same(got, want, what):
    (out, dx, grads), (out_w, dx_w, grads_w) = got, want
    assert torch.equal(bits(out), bits(out_w)), f"{what}: output differs from eager"
    assert torch.equal(bits(dx), bits(dx_w)), f"{what}: input gradient differs from eager"
    for i, (g, w) in enumerate(zip(grads, grads_w)):
        assert torch.equal(bits(g), bits(w)), f"{what}: weight{i} gradient differs from eager"


@pytest.mark.parametrize("fusion", [False, True], ids=["grad", "fused-main-grad"])
@pytest.mark.parametrize("which", ["linear_fc1", "linear_fc2"])
def test_captured_patched_grouped_linear_replays_eager_bits_and_sees_in_place_updates(which, fusion):
    layer, module, params = _module(which, fusion)
    x, dy = _inputs(module, seed=1)

    # eager warm-up on a side stream: fills the cache and the module's quantizer table
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            _reset_grads(params, fusion)
            x.grad = None
            _step(module, x, dy)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    entry = module.__dict__[STATE_ATTR]
    cached = entry.plain
    assert cached is not None, "the eager warm-up did not fill the cache"
    builds = entry.quantizer.table_builds

    want = _eager(module, params, x, dy, fusion)

    # capture: the uncached path, the QDQ kernel recorded into the graph, no H2D / pinned memory
    _reset_grads(params, fusion)
    x.grad = None
    current().reset_stats()
    watch = _HostToDeviceWatch()
    graph = torch.cuda.CUDAGraph()
    with watch, torch.cuda.graph(graph):
        static_out = _step(module, x, dy)
    assert watch.seen == [], f"host-to-device copies or pinned allocations during capture: {watch.seen}"
    stats = current().stats()
    assert stats.hits == 0 and stats.misses == 0 and stats.uncached >= 1, f"the capture used the cache: {stats}"
    assert entry.plain is cached, "the capture must leave the eager cached copy as it was"
    assert entry.quantizer.table_builds == builds, "the capture rebuilt the quantizer table"

    # the graph's static gradients: .grad / x.grad tensors written (not accumulated) on each replay,
    # or main_grad, which TE accumulates into in place (zeroed before each replay)
    static_dx = x.grad
    static_grads = [p.main_grad if fusion else p.grad for p in params]
    assert static_dx is not None and all(g is not None for g in static_grads)

    def replay():
        if fusion:
            for p in params:
                p.main_grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        return static_out, static_dx, static_grads

    _assert_same(replay(), want, "replay")

    # an in-place optimizer update of the master weights: the next replay fake-quantizes the new ones
    optimizer = torch.optim.SGD(params, lr=0.5)
    for p in params:
        p.grad = torch.randn_like(p)  # any update direction; SGD writes p in place (same pointers)
    ptrs = [p.data_ptr() for p in params]
    optimizer.step()  # the optimizer-step hook also invalidates the eager cache
    assert [p.data_ptr() for p in params] == ptrs
    for p, g in zip(params, static_grads):
        p.grad = None if fusion else g  # give the graph's static .grad tensors back
    want_new = _eager(module, params, x, dy, fusion)
    assert not torch.equal(bits(want_new[0]), bits(want[0])), "the update did not change the output"
    with torch.no_grad():
        eager_fakes = module._get_weight_tensors()  # outside TE's forward: uncached, fresh
    for i, (q, p) in enumerate(zip(eager_fakes, params)):
        assert torch.equal(bits(q), bits(mxfp4.fake_quantize(p.detach(), 32))), f"eager weight{i} stale"
    _assert_same(replay(), want_new, "replay after the in-place update")
