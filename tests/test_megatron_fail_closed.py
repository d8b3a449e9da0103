"""Sticky failure (issue 8, item 1) inside one process.

- With the real megatron-core ``MoELayer`` (0.16.1 in the venv) and no usable TE: a caller that
  swallows the error of ``enable_from_env()`` still cannot build a ``MoELayer`` or take an optimizer
  step; a second ``enable_from_env()`` raises again; ``disable()`` (an explicit opt-out) lifts it.
- In fresh interpreters with the autoload ``.pth`` active, on a miniature ``megatron`` package whose
  TE extension module mimics Transformer Engine < 2.5 (``TEGroupedLinear`` without
  ``_get_weight_tensors``) and whose importers wrap that import in ``try/except ImportError`` (as
  megatron-core's ``rope_utils.py`` does) or a bare ``except:`` (``language_module.py``): the import
  chain ends in our error, the module is not left imported unpatched, and later imports, the MoE
  layer build and an optimizer step all fail. (Real TE < 2.5 cannot be installed on the CPU CI;
  the stand-in TE module is tests/te_standin.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _mini_megatron import write_mini_megatron  # noqa: E402
from _megatron_fixtures import te_ext  # noqa: E402,F401

import megatron_qat.megatron as mm  # noqa: E402
from megatron_qat.megatron import FakeQATUnavailableError  # noqa: E402

TESTS = Path(__file__).resolve().parent
FLAG = "OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG"


def _failure():
    runtime = mm.current()
    return None if runtime is None else runtime.failure


def _step():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    torch.optim.SGD([p], lr=1.0).step()
    return p


def test_swallowed_enable_from_env_blocks_moe_layer_build_and_optimizer_step(te_ext, monkeypatch):
    """Old code: the ImportError was the only signal; once swallowed, MoELayer() ran unguarded and
    optimizer steps went on."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    monkeypatch.setattr(te_ext, "TEGroupedLinear", None)  # megatron-core without Transformer Engine
    monkeypatch.setenv(FLAG, "1")
    try:
        mm.enable_from_env()
    except Exception:  # noqa: BLE001 - what a fork's broad handler does
        pass
    assert not mm.is_enabled()
    with pytest.raises(FakeQATUnavailableError, match=r"building MoELayer refused.*TEGroupedLinear is None.*megatron-core"):
        MoELayer(config=SimpleNamespace())
    with pytest.raises(FakeQATUnavailableError, match=r"SGD\.step\(\) refused"):
        _step()
    with pytest.raises(FakeQATUnavailableError, match="TEGroupedLinear is None"):
        mm.enable_from_env()  # a second attempt
    with pytest.raises(FakeQATUnavailableError):
        _step()  # still sticky
    mm.disable()  # explicit opt-out
    assert _failure() is None
    assert torch.equal(_step(), torch.full((2,), -1.0))


def test_import_error_on_the_way_becomes_our_error(te_ext, monkeypatch):
    def broken():
        raise ImportError("No module named 'transformer_engine_torch'")

    monkeypatch.setattr("megatron_qat.megatron.runtime.load_te_grouped_linear", broken)
    with pytest.raises(FakeQATUnavailableError, match="transformer_engine_torch") as info:
        mm.enable_from_env({FLAG: "1"})
    assert not isinstance(info.value, ImportError) and isinstance(info.value.__cause__, ImportError)
    mm.disable()


def test_flag_off_records_nothing(te_ext, monkeypatch):
    monkeypatch.setattr(te_ext, "TEGroupedLinear", None)
    assert mm.enable_from_env({}) is False
    assert _failure() is None
    _step()


OLD_TE_EXTENSION = """
import torch
class TEGroupedLinear(torch.nn.Module):  # Transformer Engine < 2.5: no _get_weight_tensors
    def __init__(self, *args, **kwargs):
        super().__init__()
fused_apply_rotary_pos_emb = None
"""

MOE_LAYER = """
try:
    from megatron.core.extensions.transformer_engine import TEGroupedLinear
except ImportError:
    TEGroupedLinear = None
class MoELayer:
    def __init__(self, config=None):
        self.config = config
"""


@pytest.fixture
def old_te_megatron(tmp_path):
    return write_mini_megatron(tmp_path, MOE_LAYER, {
        "megatron/core/extensions/transformer_engine.py": OLD_TE_EXTENSION,
        "megatron/core/models/__init__.py": "",
        "megatron/core/models/rope_utils.py": (  # as megatron-core 0.13-0.15 rope_utils.py
            "try:\n    from megatron.core.extensions.transformer_engine import fused_apply_rotary_pos_emb\n"
            "except ImportError:\n    fused_apply_rotary_pos_emb = None\n"
        ),
        "megatron/core/models/language_module.py": (  # as megatron-core language_module.py
            "try:\n    from megatron.core.extensions.transformer_engine import fused_apply_rotary_pos_emb\n"
            "except:\n    pass\n"
        ),
    })


SCRIPT = """
import sys
def attempt(code):
    try:
        exec(code, {})
        return "ok"
    except Exception as exc:
        return type(exc).__name__ + ": " + str(exc)
print("first", attempt("import megatron.core.models.IMPORTER"))
print("left_imported", "megatron.core.extensions.transformer_engine" in sys.modules)
print("again", attempt("import megatron.core.models.IMPORTER"))
print("moe", attempt("from megatron.core.transformer.moe.moe_layer import MoELayer; MoELayer()"))
print("step", attempt("import torch; p = torch.nn.Parameter(torch.zeros(1)); torch.optim.SGD([p], lr=1.0).step()"))
import megatron_qat
print("enabled", megatron_qat.is_enabled())
"""


@pytest.mark.parametrize("importer", ["rope_utils", "language_module"], ids=["except_ImportError", "bare_except"])
def test_te_older_than_2_5_behind_swallowing_imports_fails_closed(old_te_megatron, importer):
    """Old code: "first ok", "left_imported True": the import error was swallowed, the module stayed
    imported unpatched and MoELayer / optimizer steps ran without fake-QAT."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPEN_TRAINING_", "MEGATRON_QAT_"))}
    env.update({FLAG: "1", "PYTHONPATH": os.pathsep.join([str(old_te_megatron), str(TESTS)])})
    code = textwrap.dedent(SCRIPT).replace("IMPORTER", importer)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())
    if importer == "rope_utils":
        assert out["first"].startswith("FakeQATUnavailableError: megatron_qat fake-QAT: TEGroupedLinear has no "
                                       "_get_weight_tensors (added in Transformer Engine 2.5)"), out["first"]
    else:  # the bare except swallows even our error: the later guards must catch it
        assert out["first"] == "ok"
    assert out["left_imported"] == "False"
    assert out["again"].startswith("FakeQATUnavailableError") or importer == "language_module"
    assert out["moe"].startswith("FakeQATUnavailableError: megatron_qat fake-QAT: TEGroupedLinear has no"), out["moe"]
    assert out["step"].startswith("FakeQATUnavailableError: SGD.step() refused"), out["step"]
    assert out["enabled"] == "False"
