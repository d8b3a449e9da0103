"""megatron_qat.metrics reduction over REAL multi-process torch.distributed (gloo on CPU,
``torch.multiprocessing`` spawn, 2 processes) with megatron-core's real ``parallel_state``:

- ``ep``: ``initialize_model_parallel(expert_model_parallel_size=2)``; each rank holds 2 of the 4
  experts of layer 1 (fc1, fc2): every rank's published values equal one process measuring all 4;
- ``pp``: ``initialize_model_parallel(pipeline_model_parallel_size=2)``; rank 0 holds layer 1, rank
  1 holds layer 2: both ranks publish both layers (the label union), each equal to its own measure.

Steps end through a real ``torch.optim.SGD`` step on each rank, reaching the recorder through an
optimizer-step post-hook as under the fake-QAT runtime. One spawn runs both scenarios.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch

from _helpers import require, spawn_ranks

WORLD = 2
EXPERTS = 4


def expert_weights(layer: int, role: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * layer + (1 if role == "fc1" else 2))
    scale = torch.exp2(torch.randint(-20, 4, (EXPERTS, 8, 2, 1), generator=gen).float())
    w = (torch.randn(EXPERTS, 8, 2, 32, generator=gen) * scale).reshape(EXPERTS, 8, 64).to(torch.bfloat16)
    w[1, 0, :32] = 2.0**-128  # a flushed block on expert 1 (rank 0 in the EP scenario)
    return list(w.unbind(0))


def _one_step(modules):
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from megatron_qat.metrics import Recorder

    recorder = Recorder()
    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: recorder.on_optimizer_step(optimizer))
    opt = torch.optim.SGD([p for m, _ in modules for p in m.parameters()], lr=0.0)
    published = []
    recorder.subscribe(lambda values, step: published.append((step, values)))
    for m, label in modules:
        if recorder.due():
            recorder.observe(m, list(m.weights), 32, label=label)
    opt.step()
    handle.remove()
    assert len(published) == 1, published
    return published[0][1]


def _module(weights):
    m = torch.nn.Module()
    m.weights = torch.nn.ParameterList(weights)
    return m


def _worker(rank, port, outdir):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    os.environ["MEGATRON_QAT_METRICS_INTERVAL"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    res = {}
    ps.initialize_model_parallel(1, 1, expert_model_parallel_size=2, create_gloo_process_groups=False)
    mine = slice(2 * rank, 2 * rank + 2)
    res["ep"] = _one_step([(_module(expert_weights(1, r)[mine]), f"layer_1/{r}") for r in ("fc1", "fc2")])
    ps.destroy_model_parallel()

    ps.initialize_model_parallel(1, 2, expert_model_parallel_size=1, create_gloo_process_groups=False)
    layer = ps.get_pipeline_model_parallel_rank() + 1
    res["pp"] = _one_step([(_module(expert_weights(layer, "fc1")), f"layer_{layer}/fc1")])
    ps.destroy_model_parallel()
    torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    require("megatron.core", "megatron-core is a test dependency ([megatron] extra)")
    return spawn_ranks(_worker, WORLD, str(tmp_path_factory.mktemp("metrics_dist")))


def _single_process(label: str, weights) -> dict[str, float]:
    from megatron_qat.metrics import block_stats, sinks
    from megatron_qat.metrics.reduction import reduce, scalars

    raw = reduce({label: block_stats.measure(weights, 32)})[label]
    return {sinks.tag(label, k): v for k, v in scalars(raw).items()}


def _assert_same(got: dict, want: dict):
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12, abs=0.0), k


def test_ep_ranks_publish_the_statistics_of_all_experts(results):
    want = {**_single_process("layer_1/fc1", expert_weights(1, "fc1")), **_single_process("layer_1/fc2", expert_weights(1, "fc2"))}
    assert want["megatron_qat/layer_1/fc1/flushed_block_frac"] == 1 / (EXPERTS * 8 * 2)
    for rank in range(WORLD):
        _assert_same(results[rank]["ep"], want)


def test_pp_stages_publish_the_union_of_their_layers(results):
    want = {**_single_process("layer_1/fc1", expert_weights(1, "fc1")), **_single_process("layer_2/fc1", expert_weights(2, "fc1"))}
    for rank in range(WORLD):
        _assert_same(results[rank]["pp"], want)
