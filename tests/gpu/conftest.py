"""Fixtures shared by the GPU tests that build real Megatron modules (tests/gpu/_moe_harness.py)."""

import pytest


@pytest.fixture(scope="module")
def megatron_gpu():
    """One-GPU torch.distributed + Megatron parallel state (initialised once per process), with
    fake-QAT off before and after the module's tests."""
    import _moe_harness as H

    import megatron_qat

    H.init_single_gpu()
    megatron_qat.disable()
    yield
    megatron_qat.disable()
