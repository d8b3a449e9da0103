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


@pytest.mark.parametrize("flag", [ON, {}], ids=["flag-on", "flag-off"])
@pytest.mark.parametrize("typo, closest", [
    ("OPEN_TRAINING_MXFP4_BLOCKSIZE", "OPEN_TRAINING_MXFP4_BLOCK_SIZE"),
    ("OPEN_TRAINING_MXFP4_FAKE_QAT", "OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG"),  # the flag itself misspelt
    ("MEGATRON_QAT_RECIPES", "MEGATRON_QAT_RECIPE"),
])
def test_unknown_own_variable_is_an_error_flag_on_or_off_naming_the_closest(flag, typo, closest):
    """Issue 17: old code checked names only with the flag on, so a misspelt flag trained silently."""
    with pytest.raises(ValueError, match=rf"unknown megatron-qat variable\(s\) {typo}='1' \(did you mean {closest}\?\): accepted names"):
        config.from_env({**flag, typo: "1"})
    assert config.from_env({**flag, "OPEN_TRAINING_SOMETHING_ELSE": "x"}).enabled is bool(flag)  # another product's


def test_pth_condition_matches_flag_requested_or_own_names():
    """The one-line .pth cannot import config; its condition must be the same as config's: the flag
    is requested, or any own-prefixed name is set (a misspelt flag is checked at Megatron's import)."""
    line = (Path(config.__file__).parent / "_autoload.pth").read_text()
    condition = line.split("; ", 1)[1].rsplit(" and __import__", 1)[0]
    for flag in (None, "", " ", "0", " 0", "1", "yes", " 1 "):
        for autoload in (None, "", "0", " 0 ", "1", "maybe"):
            for extra in ({}, {"OPEN_TRAINING_MXFP4_FAKE_QAT": "1"}, {"PATH": "/bin"}):
                env = {**({} if flag is None else {config.MXFP4_FLAG: flag}),
                       **({} if autoload is None else {config.AUTOLOAD: autoload}), **extra}
                pth = bool(eval(condition, {"os": type("os", (), {"environ": env})}))  # noqa: S307
                want = (config.flag_requested(env) or config.own_names_present(env)) and (autoload or "").strip() != "0"
                assert pth == want, env


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
