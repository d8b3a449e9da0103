"""The patch wires the per-step weight cache and the metrics into the real path (issues 9 and 11):
``enable()`` on the real megatron-core extension module (TE stand-in: tests/te_standin.py, because
Transformer Engine cannot be installed on CPU; its TEGroupedLinear.forward is megatron-core's,
over TE's ``forward(inp, m_splits, is_first_microbatch=None)``).

Checked through ``enable()`` alone, with no test-side wiring: micro-batches of one optimizer step
share one fake-quantized copy (one miss, then hits), gradients and ``main_grad`` are bit-identical
to ``MEGATRON_QAT_CACHE=0``, the optimizer step makes the next forward see the updated weights, the
metrics of a logging step are published at the optimizer step, and ``disable()`` removes the
forward wrapper and both optimizer-step hooks.
"""

from __future__ import annotations

import sys

import pytest
import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
from _megatron_fixtures import te_ext  # noqa: E402,F401
from te_standin import DDPLikeHooks, StandInGroupedLinear  # noqa: E402

import megatron_qat  # noqa: E402
import megatron_qat.megatron as mm  # noqa: E402
from megatron_qat import metrics, mxfp4  # noqa: E402

N, K, OUT = 3, 64, 16
SPLITS = ([4, 0, 6], [2, 5, 3], [3, 3, 1])


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    for name in ("MEGATRON_QAT_CACHE", "MEGATRON_QAT_METRICS_INTERVAL"):
        monkeypatch.delenv(name, raising=False)
    yield
    mm.disable()


def _train(ext, steps=2):
    """``steps`` optimizer steps of len(SPLITS) micro-batches with fused wgrad; returns the main_grad
    bits after each micro-batch, the weights' bits after each step and the layer."""
    torch.manual_seed(0)
    layer = ext.TEGroupedLinear(N, K, OUT, fuse_wgrad_accumulation=True)
    weights = [getattr(layer, f"weight{i}") for i in range(N)]
    for w in weights:
        w.main_grad = torch.zeros_like(w)
        w.grad_added_to_main_grad = False
    hooks = DDPLikeHooks(weights)
    opt = torch.optim.SGD(weights, lr=0.5)
    grads, masters = [], []
    for step in range(steps):
        for w in weights:
            w.main_grad.zero_()
            w.grad_added_to_main_grad = False
        for mb, splits in enumerate(SPLITS):
            layer.is_first_microbatch = mb == 0 if step == 0 else False  # BF16: True on the run's first forward only
            x = torch.randn(sum(splits), K, generator=torch.Generator().manual_seed(10 * step + mb))
            layer(x, splits).square().sum().backward()
            grads.append([w.main_grad.view(torch.int32).clone() for w in weights])
        for w in weights:
            w.grad = w.main_grad.clone()
        opt.step()
        masters.append([w.detach().view(torch.int32).clone() for w in weights])
    assert all(hooks.adds[w] == 0 for w in weights)  # TE wrote main_grad; the dummy was never added
    return grads, masters, layer


def test_cache_through_enable_matches_uncached_bitwise(te_ext, monkeypatch):
    mm.enable(32)
    cached = _train(te_ext)
    stats = mm.current().stats()
    assert (stats.misses, stats.hits) == (2, 4)  # one fake-quantize per optimizer step
    mm.disable()
    monkeypatch.setenv("MEGATRON_QAT_CACHE", "0")
    mm.enable(32)
    uncached = _train(te_ext)
    assert mm.current().stats().hits == 0 and mm.current().stats().uncached == 6
    for a, b in zip(cached[0] + cached[1], uncached[0] + uncached[1]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_next_step_sees_the_optimizer_update(te_ext):
    mm.enable(32)
    _, _, layer = _train(te_ext, steps=1)
    layer.is_first_microbatch = False
    got = layer._get_weight_tensors()  # outside TE's forward: uncached, the current weights
    want = mxfp4.fake_quantize_many([getattr(layer, f"weight{i}").detach() for i in range(N)], 32)
    assert all(torch.equal(g.view(torch.int32), w.view(torch.int32)) for g, w in zip(got, want))
    before = mm.current().stats().misses
    layer(torch.randn(6, K), [2, 2, 2]).sum().backward()
    assert mm.current().stats().misses == before + 1  # the step invalidated the kept copy


def test_metrics_of_a_logging_step_are_published(te_ext, monkeypatch):
    monkeypatch.setenv("MEGATRON_QAT_METRICS_INTERVAL", "1")
    mm.enable(32)
    seen = []
    metrics.subscribe(lambda values, step: seen.append((step, dict(values))))
    _train(te_ext, steps=1)
    assert len(seen) == 1 and any(key.endswith("/rel_rmse") for key in seen[0][1])


def test_disable_removes_the_forward_wrapper_and_the_step_hooks(te_ext):
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

    hooks_before = (len(_global_optimizer_pre_hooks), len(_global_optimizer_post_hooks))
    forward_before = StandInGroupedLinear.__dict__["forward"]
    mm.enable(32)
    assert StandInGroupedLinear.__dict__["forward"] is not forward_before
    assert StandInGroupedLinear.__dict__["forward"].__wrapped__ is forward_before
    assert (len(_global_optimizer_pre_hooks), len(_global_optimizer_post_hooks)) == (hooks_before[0], hooks_before[1] + 1)
    mm.disable()
    assert StandInGroupedLinear.__dict__["forward"] is forward_before
    assert (len(_global_optimizer_pre_hooks), len(_global_optimizer_post_hooks)) == hooks_before


def test_one_post_hook_serves_cache_and_metrics(te_ext, monkeypatch):
    """Issue 14: the runtime registers ONE optimizer-step post-hook (it ends the cache epoch and the
    metrics step) and no pre-hook while active; a recorded failure adds the one pre-hook."""
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

    monkeypatch.setenv("MEGATRON_QAT_METRICS_INTERVAL", "1")
    before = (len(_global_optimizer_pre_hooks), len(_global_optimizer_post_hooks))
    mm.enable(32)
    assert mm.current().recorder is not None
    assert (len(_global_optimizer_pre_hooks), len(_global_optimizer_post_hooks)) == (before[0], before[1] + 1)


@pytest.mark.parametrize("name", ["MEGATRON_QAT_CACHE", "MEGATRON_QAT_METRICS_INTERVAL"])
def test_new_variables_follow_the_one_strict_rule(name):
    from megatron_qat import config

    env = {"OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG": "1", name: "maybe"}
    with pytest.raises(ValueError, match=rf"^{name}='maybe': accepted values are "):
        config.from_env(env)
    env[name] = "0"
    assert config.from_env(env).enabled  # known to the typo check, accepted


@pytest.mark.parametrize("before, after", [("1", "0"), ("0", "2"), ("3", "1")])
def test_enable_again_reads_the_metrics_interval_again(te_ext, monkeypatch, before, after):
    """Review R1: ``disable()`` then ``enable()`` with a new MEGATRON_QAT_METRICS_INTERVAL follows
    the new value: 0 means no recorder (no statistics, nothing done at the step's end)."""
    for value in (before, after):
        monkeypatch.setenv("MEGATRON_QAT_METRICS_INTERVAL", value)
        mm.enable(32)
        recorder = mm.current().recorder
        assert (recorder is None) == (value == "0")
        if recorder is not None:
            assert metrics.interval() == int(value) and recorder.due() == (value == "1")
        else:
            with pytest.raises(RuntimeError, match="MEGATRON_QAT_METRICS_INTERVAL=0"):
                metrics.snapshot()
        mm.disable()
    with pytest.raises(RuntimeError, match="not enabled"):
        metrics.subscribe(print)


def test_bad_metrics_interval_is_refused_at_enable(te_ext, monkeypatch):
    monkeypatch.setenv("MEGATRON_QAT_METRICS_INTERVAL", "often")
    with pytest.raises(ValueError, match="MEGATRON_QAT_METRICS_INTERVAL='often'"):
        mm.enable(32)
    assert not mm.is_enabled()


def test_block_size_ablation_warns_once_per_activation(te_ext, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="megatron_qat"):
        mm.enable(16)
        mm.enable(16)
    warnings = [r for r in caplog.records if "only block size 32" in r.getMessage()]
    assert len(warnings) == 1 and "OPEN_TRAINING_MXFP4_BLOCK_SIZE=16" in warnings[0].getMessage()
