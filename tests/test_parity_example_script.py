"""examples/parity_check.sh (issue 8): it removes its temporary checkpoint (the EXIT trap used to be
lost to ``exec``) and writes nothing into the current directory (it used to drop parity_report.json)."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "parity_check.sh"


def _run(tmp_path, *args):
    cwd, tmpdir = tmp_path / "cwd", tmp_path / "tmpdir"
    cwd.mkdir(exist_ok=True)
    tmpdir.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return proc, cwd, tmpdir


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_generated_checkpoint_is_removed_and_cwd_untouched(tmp_path):
    proc, cwd, tmpdir = _run(tmp_path, "--", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "PARITY OK" in proc.stdout and "generated" in proc.stderr
    assert list(tmpdir.iterdir()) == [] and list(cwd.iterdir()) == []


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_given_checkpoint_and_json_go_where_asked(tmp_path):
    ckpt = tmp_path / "ckpt.safetensors"
    save_file({"model.layers.0.mlp.experts.0.up_proj.weight": (torch.randn(8, 64) * 0.02).bfloat16()}, str(ckpt))
    report = tmp_path / "report.json"
    proc, cwd, tmpdir = _run(tmp_path, str(ckpt), "--", "--quiet", "--json", str(report))
    assert proc.returncode == 0, proc.stderr
    assert report.exists() and list(tmpdir.iterdir()) == [] and list(cwd.iterdir()) == []
