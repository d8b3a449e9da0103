"""megatron_qat.metrics interval and step clock on CPU: MEGATRON_QAT_METRICS_INTERVAL parsing,
Megatron's log_interval / iteration (through a stand-in ``megatron.training`` module: the pip
megatron-core package has none), real ``torch.optim`` optimizers ending steps, and nothing computed
on non-logging steps (torch calls and statistic passes counted).

The :class:`~megatron_qat.metrics.Recorder` is driven as the fake-QAT runtime drives it: a global
optimizer-step post-hook calls ``on_optimizer_step`` (the runtime's own hook and its ownership of the
recorder are tested through ``enable()`` in tests/test_megatron_wiring.py)."""

from __future__ import annotations

import gc
import importlib.abc
import sys
import types
from argparse import Namespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from megatron_qat import metrics
from megatron_qat.metrics import megatron_env, recorder

ENV = "MEGATRON_QAT_METRICS_INTERVAL"


@pytest.fixture(autouse=True)
def rec(monkeypatch):
    """A fresh Recorder whose steps end at every torch optimizer step, as under the runtime."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    monkeypatch.delenv(ENV, raising=False)
    rec = _Driven()
    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: rec.recorder.on_optimizer_step(optimizer))
    yield rec
    handle.remove()


class _Driven:
    """The recorder plus the public-API spellings these tests use."""

    def __init__(self):
        self.recorder = metrics.Recorder()

    def __getattr__(self, name):
        return getattr(self.recorder, name)

    def snapshot(self):
        return dict(self.recorder.last)

    def interval(self):
        self.recorder.start()
        return self.recorder.interval


class FakeMegatronTraining:
    """A stand-in ``megatron.training`` exposing ``get_args`` / ``get_tensorboard_writer`` /
    ``get_wandb_writer`` the way megatron/training/__init__.py re-exports them from global_vars."""

    def __init__(self):
        self.args = None
        self.tensorboard = None
        self.wandb = None
        self.module = types.ModuleType("megatron.training")
        self.module.get_args = self._get_args
        self.module.get_tensorboard_writer = lambda: self.tensorboard
        self.module.get_wandb_writer = lambda: self.wandb

    def _get_args(self):
        assert self.args is not None, "args is not initialized."  # global_vars._ensure_var_is_initialized
        return self.args


@pytest.fixture
def fake_megatron(monkeypatch):
    import megatron

    fake = FakeMegatronTraining()
    monkeypatch.setitem(sys.modules, "megatron.training", fake.module)
    monkeypatch.setattr(megatron, "training", fake.module, raising=False)
    return fake


def forward(rec, module, weights, block_size=32):
    """What the runtime's weight hook does per forward."""
    if rec.due():
        rec.observe(module, weights, block_size)


def expert_module(seed=0, experts=2):
    m = torch.nn.Module()
    m.weights = torch.nn.ParameterList(
        torch.randn(8, 64, generator=torch.Generator().manual_seed(seed + i)) for i in range(experts)
    )
    return m


# -- interval ----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw,want", [("0", 0), ("7", 7), (" 3 ", 3), ("0010", 10), ("", None), ("  ", None)])
def test_interval_env_accepts_non_negative_integers(raw, want):
    assert megatron_env.interval_from_env({ENV: raw}) == want
    assert megatron_env.interval_from_env({}) is None


@pytest.mark.parametrize("raw", ["-1", "1.5", "abc", "0x10", "1e3", "+2", "3 4", "on"])
def test_interval_env_rejects_anything_else_naming_the_variable(raw):
    with pytest.raises(ValueError, match=rf"^{ENV}=.*non-negative integer.*0: off"):
        megatron_env.interval_from_env({ENV: raw})


def test_bad_env_value_fails_at_start(rec, monkeypatch):
    monkeypatch.setenv(ENV, "often")
    with pytest.raises(ValueError, match=ENV):
        rec.start()


def test_without_megatron_training_the_default_is_100(rec):
    assert megatron_env.megatron_training() is None  # pip megatron-core ships no megatron.training
    assert rec.interval() == 100


def test_interval_follows_megatron_log_interval_and_env_overrides(rec, fake_megatron, monkeypatch):
    fake_megatron.args = Namespace(log_interval=5, iteration=0)
    assert rec.interval() == 5
    monkeypatch.setenv(ENV, "2")
    assert _Driven().interval() == 2


def test_megatron_args_not_set_yet_is_the_absent_case(rec, fake_megatron):
    assert megatron_env.megatron_args() is None
    assert rec.interval() == 100


def test_a_broken_megatron_training_import_propagates(monkeypatch):
    class Broken(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "megatron.training":
                raise ModuleNotFoundError("No module named 'apex'", name="apex")
            return None

    monkeypatch.delitem(sys.modules, "megatron.training", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    with pytest.raises(ModuleNotFoundError, match="apex"):
        megatron_env.megatron_training()


# -- steps -------------------------------------------------------------------------------------


class CountTorchCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_nothing_is_computed_on_non_logging_steps(rec, monkeypatch):
    monkeypatch.setenv(ENV, "3")
    passes = []
    real_measure = recorder.GroupedStats.__call__
    monkeypatch.setattr(recorder.GroupedStats, "__call__", lambda self, *a, **k: passes.append(1) or real_measure(self, *a, **k))
    fc1, fc2 = expert_module(0), expert_module(10)
    opt = torch.optim.SGD([*fc1.weights, *fc2.weights], lr=0.0)
    torch_calls, published = [], []
    rec.subscribe(lambda values, step: published.append(step))
    for step in range(6):
        counter = CountTorchCalls()
        with counter:
            for _micro_batch in range(3):
                forward(rec, fc1, fc1.weights)
                forward(rec, fc2, fc2.weights)
        torch_calls.append(counter.calls)
        opt.step()
    assert torch_calls[0] == torch_calls[1] == torch_calls[3] == torch_calls[4] == 0
    assert torch_calls[2] > 0 and torch_calls[5] > 0
    assert len(passes) == 4  # steps 2 and 5, each module once despite 3 micro-batches
    assert published == [3, 6]  # Megatron's iteration count at the logging steps


def test_interval_zero_measures_nothing(rec, monkeypatch):
    monkeypatch.setenv(ENV, "0")
    m = expert_module()
    opt = torch.optim.SGD(list(m.weights), lr=0.0)
    for _ in range(3):
        assert rec.due() is False
        rec.observe(m, m.weights, 32)  # no-op off a logging step
        opt.step()
    assert rec.snapshot() == {}


def test_chained_optimizers_end_one_step_and_a_collected_clock_is_replaced(rec, monkeypatch):
    monkeypatch.setenv(ENV, "1")
    m = expert_module()
    dense = torch.optim.SGD([m.weights[0]], lr=0.0)
    expert = torch.optim.SGD([m.weights[1]], lr=0.0)
    steps = []
    rec.subscribe(lambda values, step: steps.append(step))
    for _ in range(2):
        forward(rec, m, m.weights)
        dense.step()
        expert.step()  # ChainedOptimizer: both step in one iteration
    assert steps == [1, 2]
    del dense
    gc.collect()
    forward(rec, m, m.weights)
    expert.step()
    assert steps == [1, 2, 3]


def test_megatron_resume_and_skipped_iterations_stay_aligned(rec, fake_megatron):
    """Megatron's loop: args.curr_iteration = iteration; train_step; iteration += 1; log when
    iteration % log_interval == 0. Resumed at 10; iterations 14 and 19 skip their optimizer step
    (fp16 overflow): the clock still measures iteration 15 (logged as 16); the statistics of 19
    (a logging iteration that never stepped) are dropped, not published late under a wrong step."""
    fake_megatron.args = args = Namespace(log_interval=4, iteration=10)
    m = expert_module()
    opt = torch.optim.SGD(list(m.weights), lr=0.0)
    published, measured = [], []
    rec.subscribe(lambda values, step: published.append(step))
    megatron_logs = []
    for iteration in range(10, 24):
        args.curr_iteration = iteration
        if rec.due():
            measured.append(iteration)
            rec.observe(m, m.weights, 32)
        if iteration not in (14, 19):
            opt.step()
        if (iteration + 1) % args.log_interval == 0:
            megatron_logs.append(iteration + 1)
    assert megatron_logs == [12, 16, 20, 24]
    assert measured == [11, 15, 19, 23]
    assert published == [12, 16, 24]


def test_a_stale_curr_iteration_does_not_hold_the_clock(rec, fake_megatron):
    fake_megatron.args = Namespace(log_interval=2, iteration=0, curr_iteration=0)  # never updated
    m = expert_module()
    opt = torch.optim.SGD(list(m.weights), lr=0.0)
    published = []
    rec.subscribe(lambda values, step: published.append(step))
    for _ in range(4):
        forward(rec, m, m.weights)
        opt.step()
    assert published == [2, 4]


def test_step_end_and_set_step_by_hand(rec, monkeypatch):
    monkeypatch.setenv(ENV, "2")
    m = expert_module()
    got = []
    rec.subscribe(lambda values, step: got.append(step))
    rec.set_step(41)
    forward(rec, m, m.weights)
    rec.step_end()
    assert got == [42] and rec.last_step == 42
    with pytest.raises(ValueError, match="non-negative int"):
        rec.set_step(-1)


def test_nothing_is_measured_during_a_cuda_graph_capture(rec, monkeypatch):
    """Review R1: a forward captured into a CUDA graph on a logging step must not be the module's
    measurement (its kernels run only at replay: the step's end would read unwritten memory); the
    next eager forward of that step measures it. CPU: the capture query is stubbed."""
    monkeypatch.setenv(ENV, "1")
    module = expert_module()
    weights = list(module.weights)
    monkeypatch.setattr(recorder, "_capturing", lambda ws: True)
    forward(rec, module, weights)
    assert rec.pending == {}
    monkeypatch.setattr(recorder, "_capturing", lambda ws: False)
    forward(rec, module, weights)
    assert len(rec.pending) == 1
    rec.step_end()
    assert rec.snapshot()
