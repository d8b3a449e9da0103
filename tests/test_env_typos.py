"""Issue 17 item 2: a misspelt megatron-qat variable NAME is caught even when the flag is off.

``OPEN_TRAINING_MXFP4_FAKE_QAT=1`` (the flag without ``_FLAG``) used to train silently without
fake-QAT: the unknown-name check ran only once the real flag was on, and with the flag off the
autoload ``.pth`` line never even loaded. Now:

- :func:`megatron_qat.config.check_names` (called by ``from_env``) refuses every unknown name with
  our prefixes, flag on or off, naming the closest known one;
- the ``.pth`` line installs the autoload whenever any name with our prefixes is set (its condition
  is :func:`megatron_qat.config.autoload_requested`), still reading only ``os.environ`` at start-up;
- so the process fails where Megatron imports its Transformer Engine extension module, in a real
  interpreter started with the installed ``.pth`` (as tests/test_autoload.py runs it).
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from _helpers import PKG, require_that
from _mini_megatron import write_mini_megatron
from megatron_qat import config

TESTS = Path(__file__).resolve().parent

TYPOS = [
    ("OPEN_TRAINING_MXFP4_FAKE_QAT", config.MXFP4_FLAG),
    ("OPEN_TRAINING_MXFP4_FAKE_QAT_FLAGS", config.MXFP4_FLAG),
    ("OPEN_TRAINING_MXFP4_BLOCKSIZE", config.MXFP4_BLOCK_SIZE),
    ("MEGATRON_QAT_KERNAL", config.KERNEL),
    ("MEGATRON_QAT_METRIC_INTERVAL", config.METRICS_INTERVAL),
    ("MEGATRON_QAT_AUTO_LOAD", config.AUTOLOAD),
]


@pytest.mark.parametrize("typo,meant", TYPOS)
@pytest.mark.parametrize("flag", ["", "0", "1"], ids=["flag-unset", "flag-0", "flag-1"])
def test_unknown_name_is_an_error_naming_the_closest_known_one(typo, meant, flag):
    env = {typo: "1", **({config.MXFP4_FLAG: flag} if flag else {})}
    with pytest.raises(ValueError) as info:
        config.from_env(env)
    text = str(info.value)
    assert text.startswith(f"unknown megatron-qat variable(s) {typo}='1' (did you mean {meant}?)"), text
    assert "accepted names are " in text and config.KERNEL in text


def test_names_of_other_products_and_far_off_names():
    assert config.from_env({"OPEN_TRAINING_INT4_FAKE_QAT_FLAG": "0", "OPEN_TRAINING_OTHER": "x"}).enabled is False
    with pytest.raises(ValueError, match=r"MEGATRON_QAT_ZZZ='x': accepted names"):  # nothing close: no guess
        config.check_names({"MEGATRON_QAT_ZZZ": "x"})


def _pth_condition():
    line = (PKG / "_autoload.pth").read_text()
    return line.split("; ", 1)[1].rsplit(" and __import__", 1)[0]


@pytest.mark.parametrize("env", [
    {}, {"PATH": "/bin"}, {config.MXFP4_FLAG: "1"}, {config.MXFP4_FLAG: "0"}, {config.MXFP4_FLAG: " "},
    {"OPEN_TRAINING_MXFP4_FAKE_QAT": "1"}, {"MEGATRON_QAT_KERNAL": "x"}, {config.AUTOLOAD: "0"},
    {config.MXFP4_FLAG: "1", config.AUTOLOAD: " 0 "}, {config.MXFP4_FLAG: "1", config.AUTOLOAD: "maybe"},
    {"OPEN_TRAINING_INT4_FAKE_QAT_FLAG": "1"}, {config.CACHE: "0"},
])
def test_pth_condition_is_autoload_requested(env):
    """The .pth line repeats the condition without importing config; both must agree."""
    pth = bool(eval(_pth_condition(), {"os": type("os", (), {"environ": env})}))  # noqa: S307
    assert pth == config.autoload_requested(env), env


def _installed_pth() -> bool:
    dirs = list(site.getsitepackages()) + [site.getusersitepackages()]
    found = [Path(d) / "megatron_qat_autoload.pth" for d in dirs if (Path(d) / "megatron_qat_autoload.pth").exists()]
    return bool(found) and found[0].read_text() == (PKG / "_autoload.pth").read_text()


def _run(code, env_extra, pythonpath):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPEN_TRAINING_", "MEGATRON_QAT_")) and k != "PYTHONPATH"}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), str(TESTS)])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          cwd=str(TESTS), timeout=300)


@pytest.fixture
def mini_megatron(tmp_path):
    return write_mini_megatron(tmp_path, "from megatron.core.extensions.transformer_engine import TEGroupedLinear\n"
                                         "class MoELayer:\n    def __init__(self, config=None):\n        self.config = config\n")


@pytest.mark.parametrize("typo,meant", [TYPOS[0], TYPOS[3]])
def test_misspelt_name_fails_the_megatron_import_with_the_flag_off(mini_megatron, typo, meant):
    require_that(_installed_pth(), "the package's megatron_qat_autoload.pth is not installed in this Python "
                                   "(pip install -e .); the real .pth mechanism is what is tested")
    code = """
        import sys
        print("at_start", sorted(m for m in ("torch", "megatron_qat.mxfp4", "megatron") if m in sys.modules))
        import megatron.core.transformer.moe.moe_layer
    """
    r = _run(code, {typo: "1"}, mini_megatron)
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert r.stdout.startswith("at_start []"), r.stdout  # interpreter start-up imported no torch
    assert f"ValueError: unknown megatron-qat variable(s) {typo}='1' (did you mean {meant}?)" in r.stderr, r.stderr


def test_no_megatron_qat_name_loads_nothing_at_start():
    require_that(_installed_pth(), "the package's megatron_qat_autoload.pth is not installed in this Python (pip install -e .)")
    r = _run("import sys; print(sorted(m for m in ('torch', 'megatron_qat', 'megatron') if m in sys.modules))", {}, TESTS)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


def test_a_name_under_the_other_prefix_is_suggested():
    with pytest.raises(ValueError, match=r"MEGATRON_QAT_BLOCK_SIZE='16' \(did you mean OPEN_TRAINING_MXFP4_BLOCK_SIZE\?\)"):
        config.check_names({"MEGATRON_QAT_BLOCK_SIZE": "16"})
