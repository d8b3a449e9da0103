"""The default run (synthetic families), the console entry points, and the --json schema."""

import json
import subprocess
import sys

from megatron_qat import cli
from megatron_qat.parity import main
from megatron_qat.parity.report import SCHEMA
from megatron_qat.numerics.families import SYNTHETIC_CASES as FAMILIES

TENSOR_KEYS = {
    "name": (str,), "file": (str, type(None)), "shape": (list,), "dtype": (str,), "numel": (int,), "status": (str,),
    "impl": (str, type(None)), "layout": (dict,), "blocked_shape": (list,), "rows_total": (int,), "rows_selected": (int,),
    "rows_compared": (int,), "elements_compared": (int,), "complete": (bool,),
    "code_mismatches": (int,), "scale_mismatches": (int,), "value_mismatches": (int,), "dequant_mismatches": (int,),
    "max_abs_diff": (float, int, str), "nonfinite_values": (int,), "excluded_rows": (int,),
    "first_mismatch": (dict, type(None)), "elapsed_s": (float, int),
}
TOTAL_KEYS = {
    "tensors_selected", "tensors_compared", "tensors_mismatched", "tensors_skipped", "elements_compared",
    "code_mismatches", "scale_mismatches", "value_mismatches", "dequant_mismatches", "nonfinite_values",
    "excluded_rows", "max_abs_diff", "elapsed_s", "tensors_not_compared", "tensors_incomplete", "rows_total",
    "rows_selected", "rows_compared",
}
LAYOUT_KEYS = {"family", "role", "blocked_dim", "expert_dim", "glu", "rule"}


def test_default_run_is_synthetic_and_passes_with_schema(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert main(["--quiet", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith(f"PARITY OK: {2 * len(FAMILIES)} tensors")
    doc = json.loads(path.read_text())
    assert set(doc) == {
        "schema", "tool_version", "status", "exit_code", "complete", "incomplete", "sampled", "sources", "include", "block_size",
        "recipe", "rule", "options", "layout", "reference", "ours", "totals", "notes", "tensors", "activations",
    }
    assert SCHEMA == "megatron-qat.parity/3"
    assert (doc["recipe"], doc["rule"], doc["activations"]) == ("flashinfer-w4a16", "flashinfer-mxfp4", None)
    assert (doc["schema"], doc["status"], doc["exit_code"], doc["sources"], doc["block_size"]) == (SCHEMA, "equal", 0, ["synthetic"], 32)
    assert (doc["complete"], doc["incomplete"], doc["sampled"]) == (True, [], False)
    assert doc["layout"] == {"family": None, "source": "synthetic", "note": None}
    assert set(doc["options"]) == {"limit", "sample_rows", "chunk_elements", "layout", "allow_incomplete"}
    assert doc["reference"]["name"] == "golden" and doc["reference"]["decodes_0x8_as"] == "-0.0" and doc["reference"]["reason"]
    assert doc["ours"]["module"] == "megatron_qat.mxfp4" and doc["ours"]["impls"]
    assert set(doc["totals"]) == TOTAL_KEYS and doc["totals"]["tensors_compared"] == 2 * len(FAMILIES)
    for t in doc["tensors"]:
        assert set(t) == set(TENSOR_KEYS)
        for key, types in TENSOR_KEYS.items():
            assert isinstance(t[key], types), (key, t[key])
        assert t["status"] == "equal" and t["elements_compared"] == t["numel"] and t["complete"]
        assert set(t["layout"]) == LAYOUT_KEYS and t["layout"]["blocked_dim"] == len(t["shape"]) - 1
    assert {t["dtype"] for t in doc["tensors"]} == {"bfloat16", "float16"}


def test_console_dispatcher_runs_parity(capsys):
    assert cli.main(["parity", "--quiet", "--synthetic"]) == 0
    assert "PARITY OK" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "megatron_qat.parity", "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "PARITY OK" in proc.stdout


def test_help_lists_flags(capsys):
    try:
        cli.main(["parity", "--help"])
    except SystemExit as exc:
        assert exc.code == 0
    text = capsys.readouterr().out
    for flag in ("--reference", "--include", "--sample-rows", "--limit", "--json", "--allow-unsupported-gpu", "--device", "--layout", "--allow-incomplete"):
        assert flag in text
