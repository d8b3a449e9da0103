"""The one rule for optional test dependencies (tests/_helpers.py ``require``): a missing package
skips a test file locally, with the reason, and FAILS it under ``CI=true`` (where ``.ci/run`` has
installed every test dependency, so a missing one is a broken set-up, not a reason to skip)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
PROBE = """
from _helpers import require

require("megatron_qat_no_such_module", "the probe's made-up dependency")


def test_never_runs():
    pass
"""


@pytest.mark.parametrize("ci,passes,says", [("", True, "1 skipped"), ("true", False, "CI=true: the probe's made-up dependency")],
                         ids=["local", "ci"])
def test_missing_dependency_skips_locally_and_fails_under_ci(tmp_path, ci, passes, says):
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {**os.environ, "CI": ci, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path / "test_probe.py")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert (r.returncode in (0, 5)) is passes, r.stdout  # 5: pytest's "no test ran" (the module was skipped)
    assert says in r.stdout, r.stdout
    if passes:
        assert "the probe's made-up dependency" in r.stdout  # the reason is shown
