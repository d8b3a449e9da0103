"""benchmarks/bench_step.py (issue 9 item 4) on CPU: it imports without a GPU, Transformer Engine or
megatron-core, ``--help`` works, and its argument rules hold. No timing: the benchmark itself needs
a GPU (see its docstring)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def test_help_runs_without_a_gpu():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--micro-batches" in done.stdout and "--shapes" in done.stdout


def test_defaults_cover_the_issue_matrix():
    bench = _load()
    args = bench.parse_args([])
    assert sorted(args.shapes) == ["dsv3", "gptoss", "qwen3"]
    assert args.micro_batches == [1, 8] and args.seq_len == 4096 and args.layers >= 4
    assert bench.VARIANTS == ("off", "cache", "cache+log", "nocache", "cache+mxfp8")
    assert args.fit is True
    local = {k: s.local_experts for k, s in bench.SHAPES.items()}
    assert local == {"qwen3": 16, "gptoss": 16, "dsv3": 8}
    for s in bench.SHAPES.values():  # every expert K is a multiple of the MXFP4 block
        assert s.hidden % 32 == 0 and s.moe_ffn % 32 == 0


@pytest.mark.parametrize("argv, message", [
    (["--layers", "2"], "--layers must be >= 4"),
    (["--steps", "5", "--rounds", "2"], "must be a multiple of --rounds"),
    (["--micro-batches", "0"], "must be positive"),
    (["--shapes", "llama"], "invalid choice"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    bench = _load()
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_targets_report_misses_with_the_amount():
    bench = _load()
    off = {"unpatched": 5.0, "hit": None, "miss": None, "uncached": None}
    host = {"unpatched": None, "hit": 25.0, "miss": 50.0, "uncached": None}
    row = dict(iqr=0.0, peak=2, counts=(0, 8, 0))
    rows = [
        dict(row, shape="S", mb=1, variant="off", ms=10.0, overhead=0.0, host=off, extra=0.0),
        dict(row, shape="S", mb=1, variant="cache", ms=10.2, overhead=2.0, host=host, extra=1.0),
        dict(row, shape="S", mb=8, variant="off", ms=10.0, overhead=0.0, host=off, extra=0.0),
        dict(row, shape="S", mb=8, variant="cache", ms=10.3, overhead=3.0, host=host, extra=1.5),
        dict(row, shape="S", mb=8, variant="cache+log", ms=10.8, overhead=8.0, host=host, extra=1.5),
        dict(row, shape="S", mb=8, variant="cache+mxfp8", ms=10.5, overhead=5.0, host=host, extra=1.5),
    ]
    lines = bench._targets(rows, {"S": {"kernel_ms": 0.2}})
    assert any("1 micro-batch: +0.200 ms" in line and line.endswith("met") for line in lines)
    assert any("overhead +3.00%" in line and "MISSED by 2 points" in line for line in lines)
    assert any("host 25.0 us" in line and "patch adds 20.0 us" in line and "MISSED by 5 us" in line for line in lines)
    assert any("host 50.0 us" in line and "on a miss" in line and line.endswith("met") for line in lines)
    assert any("1.50x" in line and "MISSED by 0.5x" in line for line in lines)
    assert any("logging step costs +0.500 ms" in line and "MISSED by 0.1 ms" in line for line in lines)
    assert any("MXFP8 activation QDQ" in line and "+1.90%" in line and line.endswith("met") for line in lines)


def test_fit_shrinks_only_the_vocabulary_on_an_80_gb_card():
    """Issue 14 item 5: gpt-oss and DSV3 shapes at 4 layers and full vocabulary ran out of memory on
    an 80 GB H100; --fit scales the vocabulary (never the expert shapes) and says so."""
    bench = _load()
    args = bench.parse_args([])
    h100 = 80 * 2**30
    for key, shape in bench.SHAPES.items():
        vocab, note = bench.fit_vocab(shape, args, h100)
        assert bench.memory_estimate(shape, args.layers, vocab, args.seq_len) <= 0.75 * h100, key
        assert (note is None) == (vocab == shape.vocab)
    assert bench.fit_vocab(bench.SHAPES["dsv3"], args, h100)[0] == bench.FIT_VOCAB
    assert bench.fit_vocab(bench.SHAPES["dsv3"], bench.parse_args(["--no-fit"]), h100) == (129280, None)
