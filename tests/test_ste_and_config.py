"""The straight-through estimator and the environment-variable contract."""

from __future__ import annotations


import pytest
import torch

from megatron_qat import config, mxfp4


# --- STE ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32))
def test_ste_forward_is_fake_quantize_and_backward_is_identity(dtype):
    w = torch.randn(4, 64, dtype=dtype, requires_grad=True)
    q = mxfp4.fake_quantize_ste(w)
    assert q.dtype == dtype and q.shape == w.shape and q.is_contiguous() and q.grad_fn is not None
    view = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(q.detach().view(view), mxfp4.fake_quantize(w.detach()).view(view))
    g = torch.randn(4, 64, dtype=dtype)
    q.backward(g)
    assert w.grad.dtype == dtype and w.grad.shape == w.shape
    assert torch.equal(w.grad.view(view), g.view(view))


def test_ste_gradient_through_a_matmul_is_the_matmul_gradient_at_the_quantized_weight():
    w = torch.randn(8, 32, requires_grad=True)
    x = torch.randn(5, 32)
    (x @ mxfp4.fake_quantize_ste(w).t()).sum().backward()
    q = mxfp4.fake_quantize(w.detach()).requires_grad_()
    (x @ q.t()).sum().backward()
    assert torch.equal(w.grad.view(torch.int32), q.grad.view(torch.int32))


def test_ste_non_contiguous_weight():
    base = torch.randn(64, 32, requires_grad=True)
    wt = base.t()  # [32, 64] non-contiguous view
    q = mxfp4.fake_quantize_ste(wt)
    assert q.is_contiguous()
    g = torch.randn(32, 64)
    q.backward(g)
    assert torch.equal(base.grad, g.t())


def test_ste_under_no_grad_records_nothing():
    w = torch.randn(4, 32, requires_grad=True)
    with torch.no_grad():
        q = mxfp4.fake_quantize_ste(w)
    assert q.grad_fn is None and not q.requires_grad
    assert torch.equal(q.view(torch.int32), mxfp4.fake_quantize(w.detach()).view(torch.int32))
    q2 = mxfp4.fake_quantize_ste(torch.randn(4, 32))  # no requires_grad: plain fake-quant
    assert q2.grad_fn is None


def test_ste_propagates_nan_forward_and_passes_gradient():
    w = torch.randn(2, 32, requires_grad=True)
    with torch.no_grad():
        w[0, 3] = float("nan")
    q = mxfp4.fake_quantize_ste(w)
    assert torch.isnan(q[0]).all() and torch.isfinite(q[1]).all()
    q.backward(torch.ones_like(q))
    assert torch.equal(w.grad, torch.ones_like(w))


# --- env contract ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "env,enabled,block",
    [
        ({}, False, 32),
        ({"OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG": "0"}, False, 32),
        ({"OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG": ""}, False, 32),
        ({"OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG": "1"}, True, 32),
        ({"OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG": "1", "OPEN_TRAINING_MXFP4_BLOCK_SIZE": "32"}, True, 32),
        ({"OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG": "1", "OPEN_TRAINING_MXFP4_BLOCK_SIZE": ""}, True, 32),
        ({"OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG": "1", "OPEN_TRAINING_INT4_FAKE_QAT_FLAG": "0"}, True, 32),
        ({"OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG": "0", "OPEN_TRAINING_INT4_FAKE_QAT_FLAG": "1"}, False, 32),
    ],
)
def test_from_env_accepted(env, enabled, block):
    cfg = config.from_env(env)
    assert cfg.enabled is enabled and cfg.block_size == block


@pytest.mark.parametrize("value", ["true", "yes", "2", "on", " 1x", "-1"])
def test_flag_rejects_other_values(value):
    with pytest.raises(ValueError, match=r"OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG=.*accepted values are \"1\""):
        config.from_env({"OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG": value})


@pytest.mark.parametrize("value", ["0", "-32", "31", "abc", "32.0", "1e2"])
def test_block_size_rejects_non_positive_even_integers(value):
    env = {"OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG": "1", "OPEN_TRAINING_MXFP4_BLOCK_SIZE": value}
    with pytest.raises(ValueError, match="OPEN_TRAINING_MXFP4_BLOCK_SIZE.*positive even integer"):
        config.from_env(env)


def test_int4_and_mxfp4_together_raise_naming_both():
    env = {"OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG": "1", "OPEN_TRAINING_INT4_FAKE_QAT_FLAG": "1"}
    with pytest.raises(RuntimeError, match="OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG=1 and OPEN_TRAINING_INT4_FAKE_QAT_FLAG=1"):
        config.from_env(env)


def test_from_env_none_reads_os_environ(monkeypatch):
    monkeypatch.setenv("OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG", "1")
    monkeypatch.delenv("OPEN_TRAINING_INT4_FAKE_QAT_FLAG", raising=False)
    monkeypatch.delenv("OPEN_TRAINING_MXFP4_BLOCK_SIZE", raising=False)
    assert config.from_env().enabled is True
    monkeypatch.setenv("OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG", "0")
    assert config.from_env().enabled is False


def test_config_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, megatron_qat.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
