"""CPU smoke of benchmarks/bench_mismatch.py (issue 16), so that the GPU benchmark cannot rot.

The smoke run (``--smoke``) trains a tiny real megatron-core 0.16.1 ``GPTModel`` through
megatron-core's ``forward_backward_no_pipelining`` (gloo, world size 1) for every training run
(BF16 and the three recipes, through ``megatron_qat.enable(recipe=...)``), exports with the real
``export_mxfp4``, and scores every variant's rollout on transformers' real ``Qwen3MoeForCausalLM``.
Transformer Engine cannot be installed on CPU, so ``TEGroupedLinear`` is the stand-in of
tests/te_standin.py and attention/norms come from megatron-core's local spec; the other CPU
adaptations (no Megatron DDP / distributed optimizer: CUDA-only buffers) are listed in the
benchmark's docstring. The script's own result check (loss falls, one initialisation, BF16 floor
small -- which a wrong Megatron -> transformers conversion breaks --, shipped bytes == trained
weights for the FlashInfer-rule runs) must pass: exit 0.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_export_live import require

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_mismatch.py"
ALL_VARIANTS = ("a", "b", "c", "d", "e", "f1", "f2")
SMOKE_STEPS, SMOKE_EVAL_STEPS, SMOKE_TOKENS = 4, [0, 4], 2 * 6  # SMOKE_DEFAULTS: steps, eval points, prompts x new tokens
METRICS = ("probs_diff_mean", "logprob_abs_diff_mean", "logprob_abs_diff_max", "k3_kl")


def _run(*args, timeout=900):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _one_line_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("bench_mismatch.py") or "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]


def test_help_needs_no_gpu():
    r = _run("--help", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--smoke" in r.stdout and "--plot-only" in r.stdout


@pytest.mark.parametrize("args, words", [
    (["--variants", "a,z"], ["--variants", "z"]),
    (["--smoke", "--hidden", "48"], ["multiples of 32"]),
    (["--steps", "50"], [">= 200 steps"]),
])
def test_bad_arguments_are_one_line_exit_2(args, words):
    _one_line_error(_run(*args, timeout=120), *words)


def test_gpu_mode_without_a_gpu_is_one_line_exit_2():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the GPU mode would run")
    _one_line_error(_run("--no-plot", timeout=300), "needs a CUDA GPU")


def test_plot_only_refuses_a_file_that_is_not_results(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("[1, 2]")
    _one_line_error(_run("--plot-only", bad, timeout=120), "not a bench_mismatch results JSON")
    assert not (tmp_path / "x.png").exists()


def _contract_or_skip():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_mismatch

    problems = bench_mismatch.contract_problems(bench_mismatch.VARIANTS)
    if problems:
        message = "the rules/recipes contract (BRIEF.md) is not on this checkout: " + "; ".join(problems)
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def test_smoke_runs_every_variant_end_to_end(tmp_path):
    require("megatron.core", "megatron-core is a test dependency ([megatron] extra)")
    require("transformers", "transformers is a test dependency (the rollout side)")
    _contract_or_skip()
    r = _run("--smoke", "--no-plot", "--out-dir", tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "mismatch_cpu-smoke.json").read_text())
    assert list(result["evals"]) == list(ALL_VARIANTS)
    assert set(result["runs"]) == {"bf16", "modelopt-w4a16", "flashinfer-w4a16", "flashinfer-trtllm-w4a8"}
    assert len({run["init_fingerprint"] for run in result["runs"].values()}) == 1
    for run in result["runs"].values():
        assert len(run["loss"]) == SMOKE_STEPS and run["loss"][-1] < run["loss"][0]
    for key, evals in result["evals"].items():
        assert [e["step"] for e in evals] == SMOKE_EVAL_STEPS, key
        assert len(result["noise"][key]) == 1, key
        for e in evals + result["noise"][key]:
            assert e["tokens"] == SMOKE_TOKENS, key
            assert all(math.isfinite(e[m]) and e[m] >= 0 for m in METRICS), (key, e)
    for key in ("e", "f2"):  # ours: the shipped bytes are the trained bits
        assert all(e["shipped_vs_trained_differ"] == 0 and e["expert_elements"] > 0 for e in result["evals"][key])
    for key in ("d", "e", "f1", "f2"):  # every export ships FlashInfer-rule (half-to-even) bytes
        assert all(e["shipped_vs_flashinfer_rule_differ"] == 0 for e in result["evals"][key])
    md = (tmp_path / "mismatch_cpu-smoke.md").read_text()
    assert "all checks passed" in md
    for v in result["meta"]["variants"].values():
        assert f"| {v['label']} |" in md
    assert not (tmp_path / "mismatch_cpu-smoke.png").exists()  # --no-plot

    r = _run("--plot-only", tmp_path / "mismatch_cpu-smoke.json", timeout=300)
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the script refuses in one line; the plot itself is drawn where matplotlib is
        _one_line_error(r, "matplotlib is not installed")
        assert not (tmp_path / "mismatch_cpu-smoke.png").exists()
    else:
        assert r.returncode == 0, r.stderr[-2000:]
        assert (tmp_path / "mismatch_cpu-smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
