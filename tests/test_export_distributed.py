"""Quantize-then-gather == gather-then-quantize, bit for bit, over REAL multi-process
torch.distributed (gloo on CPU, ``torch.multiprocessing`` spawn, world size 4).

Models: real megatron-core 0.16.1 ``TEGroupedMLP`` + ``TransformerConfig`` + ``ProcessGroupCollection``
with a Transformer Engine STAND-IN for the grouped linear (tests/te_standin.py via
tests/test_export_live.py; TE is not installable here). One spawn runs every scenario and each rank
saves what it got; the tests below compare those results, in the parent, with references built
from the full (unsharded) weights:

- ``grid``: EP=2 x expert-TP=2 (rank = 2*ep + etp), GLU fc1 (``[gate_shard; up_shard]`` per ETP
  rank), fc2 K-split (I/ETP = 32), 2 layers: every format, the BF16 baseline, ``dst`` mode;
- ``ksplit``: I/ETP = 48 -> every rank refuses (``K_shard % 32 != 0``);
- ``nonfinite``: a NaN on one rank -> every rank raises, none is left in a gather;
- ``pp``: PP=2 x EP=2 (ETP=1), biases, gpt-oss format: each stage exports its own layers under
  global numbers; a ``dst`` outside a stage's grid is refused there.
"""

from __future__ import annotations

import datetime
import os
import sys

import pytest
import torch

from _helpers import REPO, require, spawn_ranks
from test_export_live import (
    I,
    assert_same_pairs,
    build_chunk,
    global_weights,
    install_standin,
    local_shard,
    make_config,
    pg_collection,
    reference_layer,
)

WORLD = 4
EXPERTS = 4


def _run(fn):
    try:
        return {"ok": dict(fn())}
    except Exception as exc:  # recorded per rank; the tests assert on the exact outcome
        return {"error": f"{type(exc).__name__}: {exc}"}


def _worker(rank, port, outdir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    install_standin()
    from megatron_qat.export import export_mxfp4, grid_root

    sys.path.insert(0, str(REPO / "benchmarks"))  # benchmark code, not in the package
    from gather_then_quantize import gather_then_quantize

    etp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    ep_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    pp_ep_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    ep_rank, etp_rank = divmod(rank, 2)
    pg = pg_collection(etp_groups[ep_rank], ep_groups[etp_rank])
    res = {}

    def grid_model(ffn=I, poison=False):
        config = make_config(experts=EXPERTS, ep=2, etp=2, ffn=ffn)

        def shards(k):
            s = local_shard(global_weights(k, EXPERTS, True, ffn=ffn), ep_rank=ep_rank, ep=2, etp_rank=etp_rank, etp=2, glu=True)
            if poison and rank == 1:
                s["fc1"][1, 3, 0] = float("inf")
            return s

        return build_chunk([1, 2], config, pg, shards)

    model = grid_model()
    res["grid_raw"] = _run(lambda: export_mxfp4([model], "raw"))
    res["grid_gpt_oss"] = _run(lambda: export_mxfp4([model], "gpt-oss"))
    res["grid_ct"] = _run(lambda: export_mxfp4([model], "compressed-tensors", family="qwen3_moe"))
    res["grid_baseline_raw"] = _run(lambda: gather_then_quantize([model], "raw"))
    res["grid_dst3_ct"] = _run(lambda: export_mxfp4([model], "compressed-tensors", family="deepseek_v3", dst=3))
    res["grid_root"] = grid_root(pg_collection_groups(pg))
    res["ksplit"] = _run(lambda: export_mxfp4([grid_model(ffn=96)], "raw"))
    res["nonfinite"] = _run(lambda: export_mxfp4([grid_model(poison=True)], "raw"))

    stage, pp_ep_rank = divmod(rank, 2)
    pp_model = build_chunk(
        [2 * stage + 1, 2 * stage + 2], make_config(experts=EXPERTS, ep=2, bias=True), pg_collection(None, pp_ep_groups[stage]),
        lambda k: local_shard(global_weights(k, EXPERTS, True, bias=True), ep_rank=pp_ep_rank, ep=2, etp_rank=0, etp=1, glu=True),
    )
    res["pp_gpt_oss"] = _run(lambda: export_mxfp4(pp_model, "gpt-oss"))
    res["pp_dst3"] = _run(lambda: export_mxfp4(pp_model, "raw", dst=3))
    torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def pg_collection_groups(pg):
    from megatron_qat.export import ExpertGroups

    return ExpertGroups(etp=pg.expt_tp, ep=pg.ep)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    require("megatron.core", "megatron-core is a test dependency ([megatron] extra)")
    return spawn_ranks(_worker, WORLD, str(tmp_path_factory.mktemp("export_dist")))


def _reference(fmt, family=None, layers=(0, 1), bias=False):
    from megatron_qat.export import emit_layer

    want = {}
    for k in layers:
        want.update(emit_layer(reference_layer(global_weights(k, EXPERTS, True, bias=bias), k, True), fmt, family))
    return want


@pytest.mark.parametrize("key,fmt,family", [("grid_raw", "raw", None), ("grid_gpt_oss", "gpt-oss", None), ("grid_ct", "compressed-tensors", "qwen3_moe")])
def test_quantize_then_gather_equals_gather_then_quantize_ep2_etp2(results, key, fmt, family):
    """Every rank of the EP=2 x ETP=2 grid gets exactly the bytes of quantizing the full layer
    (GLU re-split of fc1, fc2 codes/scales concatenated along K/2 and K/32, global expert ids)."""
    want = _reference(fmt, family)
    for rank, res in enumerate(results):
        assert "ok" in res[key], f"rank {rank}: {res[key]}"
        assert_same_pairs(res[key]["ok"], want)


def test_bf16_baseline_path_gives_the_same_bytes(results):
    """The literal gather-BF16-then-quantize path (same groups) gives the same bytes as the export."""
    for res in results:
        assert_same_pairs(res["grid_baseline_raw"]["ok"], res["grid_raw"]["ok"])


def test_glu_resplit_is_needed(results):
    """Guard against a plain concat: concatenating ETP shards of fc1 without re-splitting gate and
    up would interleave [g0; u0; g1; u1]; the export must equal [g0; g1; u0; u1] instead."""
    from megatron_qat import mxfp4

    w = global_weights(0, EXPERTS, True)
    shards = [local_shard(w, ep_rank=0, ep=2, etp_rank=r, etp=2, glu=True)["fc1"] for r in range(2)]
    naive, _ = mxfp4.quantize(torch.cat(shards, dim=1), 32)
    got = results[0]["grid_raw"]["ok"]["decoder.layers.0.mlp.experts.linear_fc1.weight0.mxfp4_codes"]
    assert not torch.equal(got, naive[0])


def test_destination_rank_only(results):
    """dst=3: rank 3 receives the full layer (deepseek_v3 names); ranks 0-2 yield nothing."""
    want = _reference("compressed-tensors", "deepseek_v3")
    assert_same_pairs(results[3]["grid_dst3_ct"]["ok"], want)
    for rank in (0, 1, 2):
        assert results[rank]["grid_dst3_ct"] == {"ok": {}}
    assert [r["grid_root"] for r in results] == [0, 0, 0, 0]


def test_fc2_k_shard_not_multiple_of_32_is_refused_on_every_rank(results):
    for res in results:
        err = res["ksplit"]["error"]
        assert err.startswith("ExportError: ") and "K_shard" in err and "= 48" in err, err


def test_nonfinite_on_one_rank_raises_on_every_rank(results):
    assert "linear_fc1.weight1: non-finite" in results[1]["nonfinite"]["error"]
    assert "row 3" in results[1]["nonfinite"]["error"]
    for rank in (0, 2, 3):
        assert "another rank of the expert grid refused" in results[rank]["nonfinite"]["error"]


def test_pipeline_stages_export_their_layers_under_global_numbers(results):
    """PP=2 x EP=2 with biases: stage s exports layers 2s, 2s+1 (global), gpt-oss names and bytes."""
    for rank, res in enumerate(results):
        stage = rank // 2
        want = _reference("gpt-oss", layers=(2 * stage, 2 * stage + 1), bias=True)
        assert_same_pairs(res["pp_gpt_oss"]["ok"], want)


def test_destination_outside_the_stage_grid_is_refused(results):
    for rank in (0, 1):
        assert "dst=3 is not a rank of this rank's expert grid" in results[rank]["pp_dst3"]["error"]
    assert results[2]["pp_dst3"] == {"ok": {}}
    assert set(results[3]["pp_dst3"]["ok"]) == set(_reference("raw", layers=(2, 3), bias=True))
