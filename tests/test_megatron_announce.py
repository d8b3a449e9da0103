"""Say it is on (issue 8, item 2): one INFO line on the ``megatron_qat`` logger when fake-QAT becomes
active, and one per model build (patched TEGroupedLinear count, block size, kernel).

End to end in a fresh interpreter with the autoload ``.pth`` active, on a miniature ``megatron``
package whose ``MoELayer`` builds its experts from the TE stand-in (tests/te_standin.py; no
Transformer Engine on the CPU CI) -- the patch wraps that class exactly as it wraps megatron-core's.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _mini_megatron import write_mini_megatron  # noqa: E402
from _megatron_fixtures import te_ext  # noqa: E402,F401

import megatron_qat.megatron as mm  # noqa: E402

TESTS = Path(__file__).resolve().parent
FLAG = "OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG"

MOE_LAYER = """
import torch
from megatron.core.extensions.transformer_engine import TEGroupedLinear
class MoELayer(torch.nn.Module):
    def __init__(self, config=None, num_experts=2):
        super().__init__()
        self.config = config
        self.experts = torch.nn.Module()
        self.experts.linear_fc1 = TEGroupedLinear(num_experts, 64, 64)
        self.experts.linear_fc2 = TEGroupedLinear(num_experts, 64, 64)
    def forward(self, x, splits):
        return self.experts.linear_fc2(self.experts.linear_fc1(x, splits), splits)
"""

SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(name)s %(levelname)s %(message)s")
import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
model = [MoELayer() for _ in range(3)]  # one model: three MoE layers, six patched modules
x = torch.randn(4, 64)
for step in range(2):
    for layer in model:
        layer(x, [1, 3]).sum().backward()
reference = MoELayer(num_experts=4)  # a second model build
with torch.no_grad():
    reference(x, [1, 1, 1, 1])
    model[0](x, [2, 2])
"""


@pytest.fixture
def mini_megatron(tmp_path):
    return write_mini_megatron(tmp_path, MOE_LAYER)


def test_one_line_when_active_and_one_per_model_build(mini_megatron):
    """Old code: no INFO line at all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPEN_TRAINING_", "MEGATRON_QAT_"))}
    env.update({FLAG: "1", "PYTHONPATH": os.pathsep.join([str(mini_megatron), str(TESTS)])})
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT)], env=env, capture_output=True, text=True,
                       cwd=str(TESTS), timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("LOG megatron_qat INFO")]
    assert len(lines) == 3, r.stdout
    assert "MXFP4 fake-QAT active" in lines[0] and "recipe=flashinfer-w4a16" in lines[0] and "block_size=32" in lines[0] and "kernel=auto" in lines[0]
    assert lines[1].endswith("6 TEGroupedLinear modules patched in 3 MoELayer(s), recipe=flashinfer-w4a16, block_size=32, kernel=reference")
    assert lines[2].endswith("2 TEGroupedLinear modules patched in 1 MoELayer(s), recipe=flashinfer-w4a16, block_size=32, kernel=reference")


def test_activation_line_once_per_activation(te_ext, caplog):
    with caplog.at_level(logging.INFO, logger="megatron_qat"):
        mm.enable(16)
        mm.enable(16)  # already on: only the block size would change
    active = [r for r in caplog.records if "MXFP4 fake-QAT active" in r.getMessage()]
    assert len(active) == 1 and active[0].levelno == logging.INFO and "block_size=16" in active[0].getMessage()
