"""What the GPU benchmarks need from the machine before megatron-core is imported.

:func:`ensure_fused_wgrad` makes ``import fused_weight_gradient_mlp_cuda`` work: the real Apex
extension when installed, else the benchmark stand-in in ``benchmarks/apex_standin/`` (fp32
``main_grad += dY^T X``). It returns which one, for the results header ("apex" or "stand-in").
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

STANDIN_DIR = Path(__file__).resolve().parent / "apex_standin"


def ensure_fused_wgrad() -> str:
    if importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None:
        module = importlib.import_module("fused_weight_gradient_mlp_cuda")
        return "stand-in" if Path(module.__file__).resolve().parent == STANDIN_DIR else "apex"
    sys.path.insert(0, str(STANDIN_DIR))
    return "stand-in"
