"""Autoload in fresh interpreters: the installed ``megatron_qat_autoload.pth`` patches Megatron the
moment its TE extension module is imported, with no import in the "training script"; nothing loads
with the flag off; ``MEGATRON_QAT_AUTOLOAD=0`` turns it off.

The positive cases put a miniature ``megatron`` package first on PYTHONPATH whose
``core/transformer/moe/moe_layer.py`` imports ``core/extensions/transformer_engine.py`` half-way
through its own body (as megatron-core does) and whose ``TEGroupedLinear`` is the TE stand-in.
One case uses the real megatron-core installed here (no Transformer Engine): the import must fail.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from _helpers import require  # noqa: E402
from _mini_megatron import write_mini_megatron  # noqa: E402

FLAG = "OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG"


def test_pth_is_installed_and_matches_the_source():
    dirs = list(site.getsitepackages()) + [site.getusersitepackages()]
    found = [Path(d) / "megatron_qat_autoload.pth" for d in dirs if (Path(d) / "megatron_qat_autoload.pth").exists()]
    assert found, f"megatron_qat_autoload.pth not in {dirs}: install the package (pip install -e .)"
    assert found[0].read_text() == (REPO / "megatron_qat" / "_autoload.pth").read_text()


def _run(code, env_extra, pythonpath=()):
    env = {k: v for k, v in os.environ.items() if k not in (FLAG, "MEGATRON_QAT_AUTOLOAD", "PYTHONPATH")}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), str(TESTS)])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          cwd=str(TESTS), timeout=300)


@pytest.fixture
def mini_megatron(tmp_path):
    return write_mini_megatron(tmp_path, (
        "import sys\n"
        "from megatron.core.extensions.transformer_engine import TEGroupedLinear\n"
        "import megatron_qat.megatron as _m\n"
        "HALF_WAY_ENABLED = _m.is_enabled()\n"
        "class MoELayer:\n    def __init__(self, config=None):\n        self.config = config\n"
    ))


CHECK = """
import sys
at_start = sorted(m for m in ("torch", "megatron_qat.mxfp4", "megatron") if m in sys.modules)
import megatron.core.transformer.moe.moe_layer as ml
import megatron.core.extensions.transformer_engine as te
print("at_start", at_start)
print("half_way", ml.HALF_WAY_ENABLED)
from megatron_qat.megatron import current
from megatron_qat.megatron.runtime import HOOK, MOE_INIT
runtime = current()
hook = runtime.patched(HOOK) if runtime is not None else None
print("hook", hook is not None and te.TEGroupedLinear.__dict__.get("_get_weight_tensors") is hook)
init = runtime.patched(MOE_INIT) if runtime is not None else None
print("init", init is not None and ml.MoELayer.__dict__["__init__"] is init)
"""


def test_flag_off_loads_nothing():
    r = _run("import sys; print(sorted(m for m in ('torch', 'megatron_qat', 'megatron') if m in sys.modules))", {})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_flag_on_patches_at_import_without_any_import_in_the_script(mini_megatron):
    r = _run(CHECK, {FLAG: "1"}, [mini_megatron])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert "at_start []" in lines  # the .pth imported neither torch nor the numerics
    assert "half_way True" in lines  # patched the moment the extension module finished executing
    assert "hook True" in lines and "init True" in lines


def test_extension_imported_directly_then_moe_layer(mini_megatron):
    code = "import megatron.core.extensions.transformer_engine as te\n" + CHECK
    r = _run(code, {FLAG: "1"}, [mini_megatron])
    assert r.returncode == 0, r.stderr
    assert "hook True" in r.stdout and "init True" in r.stdout


def test_autoload_off_switch(mini_megatron):
    r = _run(CHECK, {FLAG: "1", "MEGATRON_QAT_AUTOLOAD": "0"}, [mini_megatron])
    assert r.returncode == 0, r.stderr
    assert "hook False" in r.stdout and "init False" in r.stdout


MISSPELT = """
import torch
def attempt(code):
    try:
        exec(code, {})
        return "ok"
    except Exception as exc:
        return type(exc).__name__ + ": " + str(exc)
print("import", attempt("import megatron.core.transformer.moe.moe_layer"))
print("again", attempt("import megatron.core.transformer.moe.moe_layer"))
print("step", attempt("import torch; p = torch.nn.Parameter(torch.zeros(1)); torch.optim.SGD([p], lr=1.0).step()"))
"""


def test_misspelt_flag_fails_the_megatron_import_and_stays_failed(mini_megatron):
    """Issue 17: ``OPEN_TRAINING_MXFP4_FAKE_QAT=1`` (the flag misspelt) trained silently without
    fake-QAT; now the Megatron import fails naming the closest name, and the failure is sticky."""
    r = _run(MISSPELT, {"OPEN_TRAINING_MXFP4_FAKE_QAT": "1"}, [mini_megatron])
    assert r.returncode == 0, r.stderr
    out = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())
    want = "ValueError: unknown megatron-qat variable(s) OPEN_TRAINING_MXFP4_FAKE_QAT='1' (did you mean OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG?)"
    assert out["import"].startswith(want), out
    assert out["again"].startswith(want), out
    assert out["step"].startswith("FakeQATUnavailableError: SGD.step() refused"), out


def test_bad_flag_value_fails_the_import(mini_megatron):
    r = _run(CHECK, {FLAG: "yes"}, [mini_megatron])
    assert r.returncode != 0 and "OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG='yes'" in r.stderr


def test_flag_on_without_transformer_engine_fails_loudly_on_real_megatron():
    """Not an ImportError (Megatron's ``except ImportError`` would swallow it); see also
    tests/test_autoload_fail_closed.py for every megatron-core release."""
    require("megatron.core", "megatron-core is a test dependency ([megatron] extra)")
    r = _run("import megatron.core.extensions.transformer_engine", {FLAG: "1"})
    assert r.returncode != 0
    assert "FakeQATUnavailableError: megatron_qat fake-QAT" in r.stderr and "transformer-engine" in r.stderr
