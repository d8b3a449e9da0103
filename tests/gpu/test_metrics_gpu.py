"""GPU: a real one-GPU Megatron MoELayer (TEGroupedMLP, TE GroupedLinear, bf16) trained for 4 steps
with the flag on writes the per-layer MXFP4 scalars to a real ``torch.utils.tensorboard.SummaryWriter``
(read back from the event file), with no change to the training loop beyond the optimizer step.

The writer reaches the metrics the way Megatron's does (``megatron.training.get_tensorboard_writer``;
the pip megatron-core package has no ``megatron.training``, so a stand-in module hands it out).
The runtime's weight hook calls its recorder's ``due()`` / ``observe(...)`` and its ``MoELayer``
init wrapper calls ``metrics.register_moe_layer`` (docs/metrics.md, "Integration").
Checks: values equal a CPU measure of the same master weights; statistics are computed only on
logging steps (pass count) and the statistics pass does not synchronise with the device.
"""

from __future__ import annotations

import os
import sys
import types
from argparse import Namespace

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.megatron]

from _helpers import require  # noqa: E402

require("tensorboard", "tensorboard is in the [test] extra")

sys.path.insert(0, os.path.dirname(__file__))
import _moe_harness as H  # noqa: E402

H.require_gpu_stack()

import megatron_qat  # noqa: E402
from megatron_qat import metrics  # noqa: E402
from megatron_qat.metrics import block_stats, recorder, sinks  # noqa: E402
from megatron_qat.metrics.reduction import reduce, scalars  # noqa: E402

LAYER = 5


@pytest.fixture
def megatron_writer(monkeypatch, tmp_path):
    import megatron
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    module = types.ModuleType("megatron.training")
    module.get_args = lambda: Namespace(log_interval=2, iteration=0)
    module.get_tensorboard_writer = lambda: writer
    module.get_wandb_writer = lambda: None
    monkeypatch.setitem(sys.modules, "megatron.training", module)
    monkeypatch.setattr(megatron, "training", module, raising=False)
    monkeypatch.delenv(metrics.INTERVAL_ENV, raising=False)
    yield writer, tmp_path
    writer.close()


def test_moe_layer_training_writes_the_scalars_to_tensorboard(megatron_writer, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer, logdir = megatron_writer
    passes = []
    real_measure = recorder.GroupedStats.__call__

    def measure_without_sync(self, *args, **kwargs):
        passes.append(1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real_measure(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(recorder.GroupedStats, "__call__", measure_without_sync)
    H.init_single_gpu()
    megatron_qat.enable(32)
    try:
        layer = H.build_moe_layer(H.make_config(fusion=False))
        layer.set_layer_number(LAYER)
        opt = torch.optim.SGD(layer.parameters(), lr=0.0)  # lr 0: the master weights stay those measured
        for x, dy in H.micro_batches(4):
            H.forward_backward(layer, x, dy)
            opt.step()
            opt.zero_grad()
    finally:
        megatron_qat.disable()
    writer.flush()
    assert len(passes) == 4, "fc1 and fc2, once each, on the two logging steps (2 and 4) only"

    events = EventAccumulator(str(logdir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    want_tags = {sinks.tag(f"layer_{LAYER}/{role}", m) for role in ("fc1", "fc2") for m in metrics.METRICS}
    assert tags == want_tags

    weights = H.expert_weights(layer)
    for role in ("fc1", "fc2"):
        label = f"layer_{LAYER}/{role}"
        mine = [p.detach().cpu() for n, p in sorted(weights.items()) if n.startswith(f"experts.linear_{role}.")]
        want = scalars(reduce({label: block_stats.measure(mine, 32)})[label])
        for metric, value in want.items():
            got = events.Scalars(sinks.tag(label, metric))
            assert [e.step for e in got] == [2, 4]
            assert got[-1].value == pytest.approx(value, rel=1e-6), (label, metric)
