"""GPU: the zero-code autoload with the INSTALLED wheel (its ``megatron_qat_autoload.pth`` in
site-packages; PYTHONPATH alone does not process ``.pth`` files) on real Transformer Engine 2.20.2 and
megatron-core 0.19.2, in fresh interpreters:

- flag on, no megatron_qat import in the script: the MoELayer built is patched, its forward equals a
  flag-off reference whose experts hold ``fake_quantize`` of the masters, and the INFO lines appear;
- ``MEGATRON_QAT_RECIPE=flashinfer-trtllm-w4a8`` is picked up the same way (the activation line names it);
- the flag misspelt (``OPEN_TRAINING_MXFP4_FAKE_QAT=1``): importing Megatron's TE extension fails,
  naming the closest variable.

Install on the GPU machine first: ``pip wheel --no-deps -w dist .`` here, carry ``dist``, then
``python3 -m pip install --no-deps --no-index dist/megatron_qat-*.whl`` there
(tests/gpu/run_device_validation.sh does it).
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.megatron]

sys.path.insert(0, os.path.dirname(__file__))
import _moe_harness as H  # noqa: E402

H.require_gpu_stack()

HERE = Path(__file__).resolve().parent


def _installed_pth() -> Path | None:
    for d in [*site.getsitepackages(), site.getusersitepackages()]:
        if (Path(d) / "megatron_qat_autoload.pth").exists():
            return Path(d) / "megatron_qat_autoload.pth"
    return None


if _installed_pth() is None:
    pytest.skip("the megatron-qat wheel is not installed in this Python's site-packages (the autoload .pth); "
                "tests/gpu/run_device_validation.sh installs it", allow_module_level=True)

SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(message)s")
import torch
import _moe_harness as H
H.init_single_gpu()
config = H.make_config(fusion=False)
layer = H.build_moe_layer(config)
ref = H.build_moe_layer(config, state_dict=layer.state_dict())
x, _ = H.micro_batches(1, seed=3)[0]
with torch.no_grad():
    got = layer(x)[0]
import megatron_qat
print("enabled", megatron_qat.is_enabled())
megatron_qat.disable()
H.overwrite_experts_with_fake_quant(ref)
with torch.no_grad():
    want = ref(x)[0]
print("equal", torch.equal(got.view(torch.int16), want.view(torch.int16)))
"""


def _run(env_extra, code=SCRIPT):
    # not the parent's MASTER_PORT (its process group holds that port): the child picks its own
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OPEN_TRAINING_", "MEGATRON_QAT_")) and k not in ("MASTER_PORT", "MASTER_ADDR")}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          cwd=str(HERE), timeout=600)


@pytest.mark.parametrize("recipe", [None, "flashinfer-trtllm-w4a8"])
def test_flag_alone_patches_a_real_moe_layer(recipe):
    env = {"OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG": "1", **({"MEGATRON_QAT_RECIPE": recipe} if recipe else {})}
    r = _run(env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "enabled True" in r.stdout, r.stdout
    active = [line for line in r.stdout.splitlines() if "MXFP4 fake-QAT active" in line]
    built = [line for line in r.stdout.splitlines() if "model built with MXFP4 fake-QAT" in line]
    assert len(active) == 1 and f"recipe={recipe or 'flashinfer-w4a16'}" in active[0], r.stdout
    assert len(built) == 1 and "in 2 MoELayer(s)" in built[0], r.stdout  # both built before the first forward
    if recipe is None:  # weights only: equal to the flag-off reference holding fake_quantize(w)
        assert "equal True" in r.stdout, r.stdout


def test_misspelt_flag_stops_the_megatron_import():
    code = "import megatron.core.extensions.transformer_engine\nprint('imported')\n"
    r = _run({"OPEN_TRAINING_MXFP4_FAKE_QAT": "1"}, code)
    assert r.returncode != 0 and "imported" not in r.stdout
    assert "did you mean OPEN_TRAINING_MXFP4_FAKE_QAT_FLAG?" in r.stderr, r.stderr[-3000:]
