"""Fail closed on REAL megatron-core releases (issue 8, item 1), in fresh interpreters with the
installed ``megatron_qat_autoload.pth`` active and ``OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG=1``.

No Transformer Engine here, so megatron-core's ``TEGroupedLinear`` is None and the patch cannot
apply. megatron-core 0.13-0.15 import ``megatron.core.extensions.transformer_engine`` first inside
``rope_utils.py``'s ``try: ... except ImportError``; an ImportError raised by the autoload was
swallowed there and training went on unpatched (the old behaviour). Now the import chain must end
in our ``FakeQATUnavailableError`` naming the installed versions, a second import attempt must fail
again, the direct import too, and an optimizer step must be refused even after a caller swallowed
every error (``except Exception``).

Releases: every line of ``.ci/megatron-core-releases`` (Python 3.11; ``.ci/megatron-core-releases-py312``
on Python >= 3.12, where megatron-core 0.17+ install), installed by ``.ci/run`` into
``.ci-mcore/<version>`` and put first on PYTHONPATH, plus the one installed in the venv (the
swallowed path on each; a fresh interpreter whose first import is the extension module on the oldest;
the venv's direct path is tests/test_autoload.py). A missing directory skips with the reason locally
and FAILS under ``CI=true``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from _helpers import require, require_that

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
FLAG = "OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG"
RELEASES_FILE = REPO / ".ci" / ("megatron-core-releases" if sys.version_info < (3, 12) else "megatron-core-releases-py312")
RELEASES = [
    line.strip()
    for line in RELEASES_FILE.read_text().splitlines()
    if line.strip() and not line.startswith("#")
]
OURS = "FakeQATUnavailableError"

SCENARIO = """
import json, sys
results = {}
def attempt(key, code):
    try:
        exec(code, {})
        results[key] = "ok"
    except Exception as exc:  # a fork that swallows everything
        results[key] = type(exc).__name__ + ": " + str(exc)
for key, code in STEPS:
    attempt(key, code)
import megatron_qat
results["enabled"] = megatron_qat.is_enabled()
results["megatron_dirs"] = sorted({m.__file__.rsplit("/megatron/", 1)[0] for n, m in sys.modules.items()
                                   if n.startswith("megatron.") and getattr(m, "__file__", None)})
print("RESULTS" + json.dumps(results))
"""

SWALLOWED = [
    # megatron-core 0.13-0.15: the first import of the TE extension module is inside rope_utils'
    # try/except ImportError (0.16 reaches it earlier, from tensor_parallel, without one)
    ("rope_utils", "import megatron.core.models.common.embeddings.rope_utils"),
    ("rope_utils_again", "import megatron.core.models.common.embeddings.rope_utils"),
    ("extension", "import megatron.core.extensions.transformer_engine"),
    ("moe_layer", "import megatron.core.transformer.moe.moe_layer"),
    ("step", "import torch; p = torch.nn.Parameter(torch.zeros(2)); torch.optim.SGD([p], lr=1.0).step()"),
]
DIRECT = [
    ("extension", "import megatron.core.extensions.transformer_engine"),
    ("extension_again", "import megatron.core.extensions.transformer_engine"),
    ("step", "import torch; p = torch.nn.Parameter(torch.zeros(2)); torch.optim.AdamW([p]).step()"),
]
DIRECT_RELEASES = RELEASES[:1]  # the oldest (the release the issue was found on); venv: tests/test_autoload.py


def _target(version):
    return None if version == "venv" else REPO / ".ci-mcore" / version


def _installed(version):
    target = _target(version)
    if target is None:
        return importlib.util.find_spec("megatron") is not None
    return (target / "megatron" / "core").is_dir()


def _require(version):
    if version == "venv":
        require("megatron.core", "megatron-core is a test dependency ([megatron] extra)")
        return
    if not _installed(version):
        target = _target(version)
        message = (
            f"megatron-core {version} is not installed in {target} (.ci/run installs it: pip install --no-deps "
            f"--target .ci-mcore/{version} megatron-core=={version})"
        )
        require_that(False, message)


def _run_scenario(version, steps):
    target = _target(version)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPEN_TRAINING_", "MEGATRON_QAT_"))}
    env.pop("PYTHONPATH", None)
    env[FLAG] = "1"
    if target is not None:
        env["PYTHONPATH"] = str(target)
    code = f"STEPS = {steps!r}\n" + textwrap.dedent(SCENARIO)
    return subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True,
                          cwd=str(TESTS), timeout=600)


@pytest.fixture(scope="module")
def scenarios():
    """All scenario interpreters, started together (two at a time: each import of megatron-core
    costs ~10 s of CPU)."""
    jobs = [(v, "swallowed", SWALLOWED) for v in RELEASES + ["venv"]] + [(v, "direct", DIRECT) for v in DIRECT_RELEASES]
    pool = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)))
    futures = {(v, name): pool.submit(_run_scenario, v, steps) for v, name, steps in jobs if _installed(v)}
    yield futures
    pool.shutdown(wait=True)


def _results(scenarios, version, name):
    _require(version)
    r = scenarios[(version, name)].result()
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULTS"))[len("RESULTS"):])
    target = _target(version)
    if target is not None:  # really ran on that release
        assert results["megatron_dirs"] == [str(target)], results["megatron_dirs"]
    return results


def _assert_ours(result, version):
    assert result.startswith(OURS + ":"), result
    assert "transformer-engine not installed" in result
    if version != "venv":
        assert f"megatron-core {version} (need >= 0.13)" in result, result


@pytest.mark.parametrize("version", RELEASES + ["venv"])
def test_swallowed_import_path_fails_closed_on_real_release(scenarios, version):
    results = _results(scenarios, version, "swallowed")
    _assert_ours(results["rope_utils"], version)  # old code: "ok", silently unpatched
    assert results["rope_utils_again"] != "ok"  # sticky: a second attempt fails too
    _assert_ours(results["extension"], version)
    assert results["moe_layer"] != "ok"
    assert results["step"].startswith(OURS + ": SGD.step() refused"), results["step"]
    assert results["enabled"] is False


@pytest.mark.parametrize("version", DIRECT_RELEASES)
def test_direct_import_fails_closed_on_real_release(scenarios, version):
    results = _results(scenarios, version, "direct")
    _assert_ours(results["extension"], version)
    _assert_ours(results["extension_again"], version)
    assert results["step"].startswith(OURS + ": AdamW.step() refused"), results["step"]
