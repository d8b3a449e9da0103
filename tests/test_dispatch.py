"""megatron_qat.mxfp4.dispatch: the impl argument, MEGATRON_QAT_KERNEL, and the auto choice."""

import subprocess
import sys

import pytest
import torch

from _helpers import require
from megatron_qat import mxfp4
from megatron_qat.mxfp4 import dispatch
from megatron_qat.mxfp4.dispatch import KERNEL_ENV, resolve_impl

CPU_BF16 = torch.zeros(2, 32, dtype=torch.bfloat16)


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    return monkeypatch


def test_auto_on_cpu_is_reference(no_env):
    assert resolve_impl(CPU_BF16, None) == "reference"


@pytest.mark.parametrize("blank", ["", "  "])
def test_empty_env_means_auto(no_env, blank):
    no_env.setenv(KERNEL_ENV, blank)
    assert resolve_impl(CPU_BF16, None) == "reference"


def test_env_uses_the_package_wide_strict_rule(no_env):
    """One rule for every variable (megatron_qat.config.read): surrounding blanks are stripped,
    values are case-sensitive, and the error is config.reject's."""
    from megatron_qat import config

    no_env.setenv(KERNEL_ENV, " reference ")
    assert resolve_impl(CPU_BF16, None) == "reference"
    no_env.setenv(KERNEL_ENV, "Reference")
    with pytest.raises(ValueError) as err:
        resolve_impl(CPU_BF16, None)
    assert str(err.value) == str(config.reject(KERNEL_ENV, "Reference"))


def test_env_reference_is_honoured(no_env):
    no_env.setenv(KERNEL_ENV, "reference")
    assert resolve_impl(CPU_BF16, None) == "reference"


def test_argument_beats_env(no_env):
    no_env.setenv(KERNEL_ENV, "triton")
    assert resolve_impl(CPU_BF16, "reference") == "reference"


@pytest.mark.parametrize("value", ["Triton", "cuda", "ref", "1"])
def test_invalid_env_value_is_a_value_error_naming_the_variable(no_env, value):
    no_env.setenv(KERNEL_ENV, value)
    with pytest.raises(ValueError, match=rf'{KERNEL_ENV}=.*accepted values are "reference", "triton"; unset or empty means auto'):
        resolve_impl(CPU_BF16, None)


def test_invalid_argument_is_a_value_error_naming_impl(no_env):
    with pytest.raises(ValueError, match=r"impl='fast': accepted values are \"reference\", \"triton\""):
        resolve_impl(CPU_BF16, "fast")


def test_forced_triton_on_cpu_without_interpreter_is_an_error(no_env):
    no_env.setenv("TRITON_INTERPRET", "0")
    no_env.setenv(KERNEL_ENV, "triton")
    with pytest.raises(RuntimeError, match=rf"{KERNEL_ENV}=triton was requested.*TRITON_INTERPRET=1 is not set"):
        resolve_impl(CPU_BF16, None)
    with pytest.raises(RuntimeError, match=r"impl=triton was requested.*CPU tensor"):
        resolve_impl(CPU_BF16, "triton")


def test_forced_triton_with_unsupported_dtype_is_an_error(no_env):
    no_env.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match=r"impl=triton was requested.*torch.float64"):
        resolve_impl(torch.zeros(2, 32, dtype=torch.float64), "triton")


def test_forced_triton_without_triton_installed_is_an_error(no_env):
    no_env.setattr(dispatch, "triton_installed", lambda: False)
    no_env.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match=r"impl=triton was requested.*triton package is not installed"):
        resolve_impl(CPU_BF16, "triton")


def test_auto_without_triton_installed_is_reference(no_env):
    no_env.setattr(dispatch, "triton_installed", lambda: False)
    assert resolve_impl(CPU_BF16, None) == "reference"


def test_forced_triton_on_cpu_with_interpreter_runs_the_kernel(no_env):
    require("triton", "the triton extra is not installed")
    no_env.setenv("TRITON_INTERPRET", "1")
    no_env.setenv(KERNEL_ENV, "triton")
    x = torch.randn(4, 64).to(torch.bfloat16)
    assert resolve_impl(x, None) == "triton"
    if torch.cuda.is_available():
        pytest.skip("kernel module was imported for CUDA in this process; the interpreter run is covered on CPU CI")
    out = mxfp4.fake_quantize(x)
    assert torch.equal(out.view(torch.int16), mxfp4.fake_quantize(x, impl="reference").view(torch.int16))
    many = mxfp4.fake_quantize_many([x, x[:2]])
    assert torch.equal(many[1].view(torch.int16), out[:2].view(torch.int16))
    codes, scales = mxfp4.quantize(x)
    ref_codes, ref_scales = mxfp4.quantize(x, impl="reference")
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)


def test_importing_mxfp4_does_not_import_triton():
    code = "import sys, megatron_qat.mxfp4; print('triton' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
