"""One command for the lead on the lent GPU: prints device, versions and each check PASS/FAIL.

    python tests/gpu/run_megatron_validation.py            # default quantizer dispatch
    MEGATRON_QAT_KERNEL=triton python tests/gpu/run_megatron_validation.py

Exit status is pytest's. Paste the printed summary into docs/validation.md.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys

import pytest
import torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root


def _version(*names):
    for n in names:
        try:
            return md.version(n)
        except md.PackageNotFoundError:
            pass
    return "not installed"


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    print(f"device: {device}; torch {torch.__version__}; transformer-engine "
          f"{_version('transformer-engine', 'transformer_engine')}; megatron-core {_version('megatron-core')}; "
          f"python {sys.version.split()[0]}; MEGATRON_QAT_KERNEL={os.environ.get('MEGATRON_QAT_KERNEL', '(unset)')}")
    return pytest.main([os.path.join(here, "test_megatron_gpu.py"), "-q", "-s", "-rs", "-p", "no:cacheprovider"])


if __name__ == "__main__":
    sys.exit(main())
