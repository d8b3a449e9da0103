"""Honest exit codes (issue 8, item 6): 0 only for a full (or deliberately sampled) identical
comparison, 1 mismatch, 2 usage/environment error as one stderr line (and a --json report with
exit_code), 3 incomplete (skipped tensors, excluded rows, a tensor with nothing finite)."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import save_file

from _helpers import one_line_error
from megatron_qat.parity import main

GOOD = "model.layers.0.mlp.experts.0.up_proj.weight"
NAN = "model.layers.0.mlp.experts.1.up_proj.weight"


def _ckpt(tmp_path, tensors):
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return str(path)


def _run(tmp_path, argv, capsys):
    report = tmp_path / "report.json"
    code = main(["--quiet", "--reference", "golden", "--json", str(report), *argv])
    out = capsys.readouterr()
    return code, json.loads(report.read_text()), out


def _good():
    return (torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()


def test_all_nan_expert_tensor_is_incomplete_not_ok(tmp_path, capsys):
    path = _ckpt(tmp_path, {GOOD: _good(), NAN: torch.full((8, 64), float("nan")).bfloat16()})
    code, doc, out = _run(tmp_path, [path], capsys)
    assert code == 3 and doc["exit_code"] == 3 and doc["status"] == "incomplete" and not doc["complete"]
    assert doc["incomplete"] == ["1 tensor(s) with no finite row"]
    by = {t["name"]: t for t in doc["tensors"]}
    assert by[NAN]["status"].startswith("not compared") and by[NAN]["rows_compared"] == 0 and not by[NAN]["complete"]
    summary = out.out.strip().splitlines()[-1]
    assert summary.startswith("PARITY INCOMPLETE: 1 tensors") and "INCOMPLETE: 1 tensor(s) with no finite row" in summary
    code, doc, out = _run(tmp_path, [path, "--allow-incomplete"], capsys)
    assert code == 0 and doc["status"] == "incomplete" and doc["exit_code"] == 0
    assert out.out.strip().splitlines()[-1].startswith("PARITY OK (INCOMPLETE, allowed by --allow-incomplete)")


def test_only_nan_tensors_is_never_a_pass(tmp_path, capsys):
    path = _ckpt(tmp_path, {NAN: torch.full((8, 64), float("nan")).bfloat16()})
    for extra in ([], ["--allow-incomplete"]):
        code, doc, out = _run(tmp_path, [path, *extra], capsys)
        assert code == 3 and doc["status"] == "nothing compared" and "PARITY NOT RUN (INCOMPLETE)" in out.out


def test_skipped_and_excluded_rows_exit_3(tmp_path, capsys):
    bad_rows = _good()
    bad_rows[2, 5] = float("inf")
    cases = {
        "skipped K": {GOOD: _good(), NAN: torch.ones(8, 48).bfloat16()},
        "skipped fp8": {GOOD: _good(), NAN: torch.ones(8, 64).to(torch.float8_e4m3fn)},
        "excluded rows": {GOOD: _good(), NAN: bad_rows},
    }
    for label, tensors in cases.items():
        code, doc, _ = _run(tmp_path, [_ckpt(tmp_path, tensors)], capsys)
        assert (code, doc["status"]) == (3, "incomplete"), (label, doc["incomplete"])
        code, _, _ = _run(tmp_path, [_ckpt(tmp_path, tensors), "--allow-incomplete"], capsys)
        assert code == 0, label


def test_sampled_run_exits_0_and_says_it_sampled(tmp_path, capsys):
    path = _ckpt(tmp_path, {GOOD: _good()})
    code, doc, out = _run(tmp_path, [path, "--sample-rows", "3"], capsys)
    assert code == 0 and doc["status"] == "equal" and doc["complete"] and doc["sampled"]
    assert (doc["totals"]["rows_selected"], doc["totals"]["rows_total"]) == (3, 8)
    summary = out.out.strip().splitlines()[-1]
    assert summary.startswith("PARITY OK (SAMPLED)") and "sampled 3 of 8 rows" in summary
    code, doc, out = _run(tmp_path, [path], capsys)
    assert code == 0 and not doc["sampled"] and out.out.strip().splitlines()[-1].startswith("PARITY OK: ")


def _cli(args, env_update=None, drop=()):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_update or {})
    return subprocess.run([sys.executable, "-m", "megatron_qat.parity", "--quiet", *args], capture_output=True, text=True, env=env, timeout=120)


def test_forced_triton_that_cannot_run_is_one_line_exit_2_in_a_real_process(tmp_path):
    report = tmp_path / "r.json"
    proc = _cli(["--impl", "triton", "--json", str(report)], drop=("TRITON_INTERPRET",))
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    one_line_error(proc.stderr, "parity", "--impl", "TRITON_INTERPRET=1")
    doc = json.loads(report.read_text())
    assert (doc["status"], doc["exit_code"]) == ("error", 2) and "TRITON_INTERPRET" in doc["error"]


def test_bad_kernel_variable_is_exit_2_with_a_json_report(tmp_path, capsys, monkeypatch):
    report = tmp_path / "r.json"
    monkeypatch.setenv("MEGATRON_QAT_KERNEL", "bogus")
    assert main(["--quiet", "--json", str(report)]) == 2
    out = capsys.readouterr()
    one_line_error(out.err, "parity", "MEGATRON_QAT_KERNEL", "bogus", '"reference", "triton"')
    assert out.out == "" and json.loads(report.read_text())["exit_code"] == 2  # refused before any comparison


def test_unwritable_json_is_refused_before_the_run(tmp_path, capsys):
    assert main(["--quiet", "--json", "/nonexistent/dir/x.json"]) == 2
    out = capsys.readouterr()
    one_line_error(out.err, "parity", "/nonexistent/dir/x.json", "does not exist")
    assert out.out == ""  # nothing was compared first
    assert main(["--quiet", "--json", str(tmp_path)]) == 2
    one_line_error(capsys.readouterr().err, "parity", "is a directory")


def test_usage_error_still_writes_the_json_report(tmp_path, capsys):
    path = _ckpt(tmp_path, {GOOD: _good()})
    report = tmp_path / "r.json"
    assert main(["--quiet", "--include", r"layers\.\d+\.nothing", "--json", str(report), path]) == 2
    err = capsys.readouterr().err
    doc = json.loads(report.read_text())
    assert (doc["status"], doc["exit_code"], doc["include"]) == ("error", 2, r"layers\.\d+\.nothing")
    # the regex is shown as typed, shell-quoted so it can be pasted back (not repr's doubled backslashes)
    assert r"--include 'layers\.\d+\.nothing'" in err and "\\\\" not in err


def test_json_in_a_directory_that_refuses_files_is_exit_2_before_the_run(capsys):
    """/proc refuses new files even to root, for whom os.access(W_OK) says yes: the probe creates
    a file the way write_json does, so the refusal comes before the run, not as a traceback after."""
    if not os.path.isdir("/proc"):
        import pytest

        pytest.skip("needs Linux /proc (a directory in which nobody can create a file)")
    assert main(["--quiet", "--json", "/proc/megatron_qat_parity.json"]) == 2
    out = capsys.readouterr()
    one_line_error(out.err, "parity", "--json /proc/megatron_qat_parity.json", "not writable")
    assert out.out == ""


def test_report_that_cannot_be_written_at_the_end_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    import errno

    from megatron_qat.parity import runner

    def full(path, doc):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runner, "write_json", full)
    assert main(["--quiet", "--json", str(tmp_path / "r.json")]) == 2
    one_line_error(capsys.readouterr().err, "parity", f"--json {tmp_path / 'r.json'}", "No space left on device")
