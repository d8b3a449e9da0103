"""GPU check 3b of issue 10: on a real one-GPU Megatron MoELayer (TEGroupedMLP, SwiGLU, bf16, fake-QAT
flag on), the exported MXFP4 codes and scales, decoded, equal bit for bit the fake-quantized expert
weights the training forward used in the same step.

Run on the lent GPU (TE 2.20.2, megatron-core 0.19.2): ``python -m pytest -q tests/gpu/test_export_gpu.py``.
NOT RUN in the session that wrote it (no GPU there). The forward's weights are recorded by wrapping
each TEGroupedLinear instance's ``_get_weight_tensors`` (the patched hook) for one training step
(forward + backward); the export then runs on the same, not yet updated, weights with the Triton
kernel (the training numerics on CUDA).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.megatron]


sys.path.insert(0, os.path.dirname(__file__))
import _moe_harness as H  # noqa: E402

H.require_gpu_stack()

import megatron_qat  # noqa: E402
from megatron_qat import mxfp4  # noqa: E402
from megatron_qat.export import ExpertGroups, export_mxfp4  # noqa: E402


class _Layer(torch.nn.Module):
    """Gives the MoELayer a TransformerLayer-like parent with a global layer_number."""

    def __init__(self, moe):
        super().__init__()
        self.layer_number = 1
        self.mlp = moe


def _record_forward_weights(layer):
    seen = {}
    for role in ("fc1", "fc2"):
        lin = getattr(layer.experts, f"linear_{role}")
        hooked = lin._get_weight_tensors  # the patched class method, bound

        def record(_hooked=hooked, _role=role):
            out = _hooked()
            seen[_role] = [w.detach().clone() for w in out]
            return out

        lin._get_weight_tensors = record
    return seen


@pytest.fixture(scope="module", autouse=True)
def _gpu_session(megatron_gpu):
    yield


@pytest.mark.parametrize("fmt,recipe", [("raw", "flashinfer-w4a16"), ("gpt-oss", "flashinfer-w4a16"),
                                        ("raw", "vllm-online-w4a16"), ("gpt-oss", "modelopt-w4a16")])
def test_export_decodes_to_the_weights_the_forward_used(fmt, recipe):
    """The export follows the running recipe's weight rule (issue 15 item 5): no rule is passed."""
    from megatron_qat.numerics.rules import RECIPES

    megatron_qat.enable(recipe=recipe)
    layer = H.build_moe_layer(H.make_config(fusion=False))
    seen = _record_forward_weights(layer)
    x, dy = H.micro_batches(1)[0]
    H.forward_backward(layer, x, dy)
    assert set(seen) == {"fc1", "fc2"}, "the forward did not call the patched _get_weight_tensors"
    got = dict(export_mxfp4(_Layer(layer), fmt, groups=ExpertGroups()))
    for role in ("fc1", "fc2"):
        for e, used in enumerate(seen[role]):
            if fmt == "raw":
                name = f"decoder.layers.0.mlp.experts.linear_{role}.weight{e}"
                codes, scales = got[name + ".mxfp4_codes"], got[name + ".mxfp4_scales"]
            else:
                base = "model.layers.0.mlp.experts." + ("gate_up_proj" if role == "fc1" else "down_proj")
                codes = got[base + "_blocks"][e].flatten(-2)
                scales = got[base + "_scales"][e]
                if role == "fc1":  # gpt-oss interleaves gate/up rows; Megatron fc1 is [gate; up]
                    codes = torch.cat([codes[0::2], codes[1::2]])
                    scales = torch.cat([scales[0::2], scales[1::2]])
            decoded = mxfp4.dequantize(codes, scales, used.dtype, rule=RECIPES[recipe].weights)
            assert torch.equal(decoded.view(torch.int16), used.view(torch.int16)), f"{fmt} {role} expert {e}"
