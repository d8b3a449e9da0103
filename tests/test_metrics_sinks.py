"""Where megatron_qat.metrics values go, on CPU: a real ``torch.utils.tensorboard.SummaryWriter``
handed out by (a stand-in of) Megatron's ``get_tensorboard_writer()``, read back from the event
file; a W&B-style writer; no writer -> nothing written; subscribe / unsubscribe / snapshot; the INFO
summary and the once-per-expert NaN WARNING; module labels from a registered MoE layer."""

from __future__ import annotations

import logging
from argparse import Namespace

import pytest
import torch

from _helpers import require
from megatron_qat import metrics
from megatron_qat.metrics import sinks
from test_metrics_steps import ENV, expert_module, fake_megatron, forward, rec  # noqa: F401

TAGS = {f"megatron_qat/layer_3/{role}/{m}" for role in ("fc1", "fc2") for m in metrics.METRICS}


class FakeMoELayer(torch.nn.Module):
    """The attributes of a megatron-core MoELayer that labelling reads: experts.linear_fc1/2,
    layer_number (set later by TransformerLayer.set_layer_number) and local_expert_indices."""

    def __init__(self, layer_number=None, experts=2, first_expert=0):
        super().__init__()
        self.experts = torch.nn.Module()
        self.experts.linear_fc1 = expert_module(0, experts)
        self.experts.linear_fc2 = expert_module(5, experts)
        self.layer_number = layer_number
        self.local_expert_indices = list(range(first_expert, first_expert + experts))


def run_steps(rec, moe, steps, opt=None):
    opt = opt or torch.optim.SGD([p for p in moe.parameters()], lr=0.0)
    for _ in range(steps):
        for lin in (moe.experts.linear_fc1, moe.experts.linear_fc2):
            forward(rec, lin, lin.weights)
        opt.step()


def test_real_summary_writer_gets_every_metric_of_every_layer(rec, fake_megatron, tmp_path, monkeypatch):
    require("tensorboard", "tensorboard is in the [test] extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    fake_megatron.args = Namespace(log_interval=2, iteration=0)
    fake_megatron.tensorboard = writer = SummaryWriter(log_dir=str(tmp_path))
    moe = FakeMoELayer()
    assert metrics.register_moe_layer(moe) == 2
    moe.layer_number = 3  # set_layer_number after construction: the label follows
    run_steps(rec, moe, 4)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["scalars"]) == TAGS
    values = rec.snapshot()
    for name in TAGS:
        got = events.Scalars(name)
        assert [e.step for e in got] == [2, 4]
        assert got[-1].value == pytest.approx(values[name], rel=1e-6)
    assert 0.0 < values["megatron_qat/layer_3/fc1/rel_rmse"] < 0.5


def test_wandb_writer_gets_one_log_call_per_logging_step(rec, fake_megatron):
    calls = []
    fake_megatron.args = Namespace(log_interval=1, iteration=0)
    fake_megatron.wandb = Namespace(log=lambda values, step: calls.append((set(values), step)))
    moe = FakeMoELayer(layer_number=3)
    metrics.register_moe_layer(moe)
    run_steps(rec, moe, 2)
    assert calls == [(TAGS, 1), (TAGS, 2)]


def test_no_writer_nothing_written(rec, fake_megatron):
    fake_megatron.args = Namespace(log_interval=1, iteration=0)
    assert sinks.write_to_megatron({"a": 1.0}, 1) == 0  # Megatron gives None on non-last ranks
    run_steps(rec, FakeMoELayer(layer_number=1), 1)
    assert rec.snapshot()  # values still reach snapshot()


def test_no_megatron_training_nothing_written():
    assert sinks.write_to_megatron({"a": 1.0}, 1) == 0


def test_subscribe_unsubscribe_and_snapshot(rec, monkeypatch):
    monkeypatch.setenv(ENV, "1")
    assert rec.snapshot() == {} and rec.last_step is None
    got = []
    unsubscribe = rec.subscribe(lambda values, step: got.append((step, values)))
    moe = FakeMoELayer(layer_number=3)
    metrics.register_moe_layer(moe)
    run_steps(rec, moe, 1)
    assert [s for s, _ in got] == [1] and set(got[0][1]) == TAGS
    snap = rec.snapshot()
    assert snap == got[0][1] and rec.last_step == 1
    snap.clear()
    assert rec.snapshot()  # a copy
    unsubscribe()
    run_steps(rec, moe, 1)
    assert len(got) == 1 and rec.last_step == 2
    with pytest.raises(TypeError, match="callable"):
        rec.subscribe(42)


def test_a_subscriber_error_propagates(rec, monkeypatch):
    monkeypatch.setenv(ENV, "1")
    rec.subscribe(lambda values, step: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run_steps(rec, FakeMoELayer(layer_number=1), 1)


def test_summary_line_and_nan_warning_once_per_expert(rec, monkeypatch, caplog):
    monkeypatch.setenv(ENV, "1")
    moe = FakeMoELayer(layer_number=4, experts=3, first_expert=6)
    metrics.register_moe_layer(moe)
    with torch.no_grad():
        moe.experts.linear_fc2.weights[1][2, 7] = float("nan")
    caplog.set_level(logging.INFO, logger="megatron_qat.metrics")
    run_steps(rec, moe, 2)
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(info) == 2 and "2 expert modules" in info[0] and "non-finite blocks 1" in info[0]
    assert "worst rel_rmse" in info[0] and "(layer_4/fc" in info[0]
    assert len(warnings) == 1 and "layer_4/fc2 expert 7" in warnings[0] and "1 block(s)" in warnings[0]
    with torch.no_grad():
        moe.experts.linear_fc1.weights[0][0, 0] = float("inf")
    run_steps(rec, moe, 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "layer_4/fc1 expert 6" in warnings[1]


def test_labels_explicit_registered_and_fallback(rec, monkeypatch):
    monkeypatch.setenv(ENV, "1")
    registered = FakeMoELayer(layer_number=2)
    metrics.register_moe_layer(registered)
    loose = expert_module(3)
    loose.ub_name = "fc2"  # what TE's GroupedLinear keeps from megatron's tp_comm_buffer_name
    other = expert_module(4)
    opt = torch.optim.SGD([*registered.parameters(), *loose.parameters(), *other.parameters()], lr=0.0)
    assert rec.due()
    rec.observe(registered.experts.linear_fc1, registered.experts.linear_fc1.weights, 32)
    rec.observe(loose, loose.weights, 32)
    rec.observe(other, other.weights, 32, label="mtp_1/fc1")
    opt.step()
    labels = {k.split("/", 1)[1].rsplit("/", 1)[0] for k in rec.snapshot()}
    assert labels == {"layer_2/fc1", "module_0/fc2", "mtp_1/fc1"}
    with pytest.raises(ValueError, match="label"):
        rec.due() and rec.observe(other, other.weights, 32, label="/bad/")
