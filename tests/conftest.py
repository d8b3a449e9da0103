"""Test configuration shared by the CPU suite (CI) and the GPU suite (tests/gpu, lent GPU).

On a machine without CUDA, Triton kernels run in its interpreter (``TRITON_INTERPRET=1``), which
must be set before Triton is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _capability():
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability()


def pytest_collection_modifyitems(config, items):
    cap = _capability()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run tests/gpu on the lent GPU (docs/validation.md)")
    skip_sm100 = pytest.mark.skip(
        reason=f"needs compute capability >= 10.0 (Blackwell); this machine has {cap or 'no GPU'}"
    )
    for item in items:
        if "gpu" in item.keywords and cap is None:
            item.add_marker(skip_gpu)
        if "sm100" in item.keywords and (cap is None or cap < (10, 0)):
            item.add_marker(skip_sm100)
