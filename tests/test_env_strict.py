"""One strict rule for every ``OPEN_TRAINING_*`` / ``MEGATRON_QAT_*`` variable (issue 8, item 7):
stripped value, unset/empty = default, anything else must be one of the accepted values, and the
error names the variable, the value and the accepted values."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_qat import config

TESTS = Path(__file__).resolve().parent
ON = {config.MXFP4_FLAG: "1"}


def test_autoload_maybe_is_refused():
    """Old code: MEGATRON_QAT_AUTOLOAD was never validated (anything but "0" meant on)."""
    with pytest.raises(ValueError, match=r"MEGATRON_QAT_AUTOLOAD='maybe': accepted values are \"1\".*\"0\""):
        config.from_env({**ON, config.AUTOLOAD: "maybe"})


def test_int4_yes_with_mxfp4_on_is_an_error():
    """Old code: only INT4=="1" was a conflict; "yes" was silently ignored."""
    with pytest.raises(ValueError, match=r"OPEN_TRAINING_INT4_FAKE_QAT_FLAG='yes': accepted values are \"1\""):
        config.from_env({**ON, config.INT4_FLAG: "yes"})


@pytest.mark.parametrize(
    "name,bad",
    [
        (config.MXFP4_FLAG, "yes"),
        (config.MXFP4_BLOCK_SIZE, "33"),
        (config.INT4_FLAG, "true"),
        (config.AUTOLOAD, "off"),
        (config.KERNEL, "Triton"),
    ],
)
def test_every_variable_is_parsed_by_the_same_rule(name, bad):
    env = {**ON, name: bad}
    accepted, default = config.VARIABLES[name]
    with pytest.raises(ValueError) as info:
        config.from_env(env)
    assert str(info.value) == f"{name}={bad!r}: accepted values are {accepted}; unset or empty means {default}"
    assert config.from_env({**ON, name: "  "}).enabled is (name != config.MXFP4_FLAG)  # blank = default


@pytest.mark.parametrize(
    "env,expected",
    [
        ({config.AUTOLOAD: " 0 "}, dict(autoload=False)),
        ({config.AUTOLOAD: "1"}, dict(autoload=True)),
        ({config.MXFP4_BLOCK_SIZE: " 16 "}, dict(block_size=16)),
        ({config.INT4_FLAG: "0"}, dict(enabled=True)),
    ],
)
def test_accepted_values_with_whitespace(env, expected):
    cfg = config.from_env({config.MXFP4_FLAG: " 1 ", **env})
    assert all(getattr(cfg, k) == v for k, v in expected.items())


def test_kernel_variable_is_checked_when_the_flag_is_read():
    """Old code: a bad MEGATRON_QAT_KERNEL surfaced only at the first quantize call."""
    with pytest.raises(ValueError, match=r"MEGATRON_QAT_KERNEL='bogus': accepted values are \"reference\", \"triton\""):
        config.from_env({**ON, config.KERNEL: "bogus"})
    assert config.kernel_choice({config.KERNEL: " triton "}) == "triton"
    assert config.kernel_choice({}) is None


def test_unknown_own_variable_is_a_typo_error_flag_on_or_off():
    """Flag on or off (issue 17: the off case used to be "not our business"); tests/test_env_typos.py
    has the rest (closest-name hints, the .pth condition, the Megatron import)."""
    for env in ({**ON, "OPEN_TRAINING_MXFP4_BLOCKSIZE": "16"}, {"OPEN_TRAINING_MXFP4_BLOCKSIZE": "16"}):
        with pytest.raises(ValueError, match=r"unknown megatron-qat variable\(s\) OPEN_TRAINING_MXFP4_BLOCKSIZE='16' \(did you mean"):
            config.from_env(env)
    assert config.from_env({**ON, "OPEN_TRAINING_SOMETHING_ELSE": "x"}).enabled  # another product's namespace


def test_autoload_maybe_fails_the_megatron_import_not_the_interpreter(tmp_path):
    """The .pth only installs the watcher; the strict check runs at the TE extension import (an error
    in a .pth line would only be printed by ``site``)."""
    ext = tmp_path / "megatron" / "core" / "extensions"
    ext.mkdir(parents=True)
    for pkg in (tmp_path / "megatron", tmp_path / "megatron" / "core", ext):
        (pkg / "__init__.py").write_text("")
    (ext / "transformer_engine.py").write_text("TEGroupedLinear = None\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPEN_TRAINING_", "MEGATRON_QAT_"))}
    env.update({config.MXFP4_FLAG: "1", config.AUTOLOAD: "maybe", "PYTHONPATH": str(tmp_path)})
    code = textwrap.dedent("""
        print("started")
        import megatron.core.extensions.transformer_engine
    """)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stdout.startswith("started")
    assert "ValueError: MEGATRON_QAT_AUTOLOAD='maybe': accepted values are" in r.stderr, r.stderr
