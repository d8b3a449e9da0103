"""megatron-qat parity against the real FlashInfer on the lent GPU.

Run (lead): ``source /opt/mqat/env.sh && python -m pytest -q tests/gpu/test_parity_flashinfer_gpu.py -rs``

- below sm_100: ``--reference flashinfer`` exits 2 with the sm_100 refusal, and with
  ``--allow-unsupported-gpu`` the canary catches FlashInfer's uninitialized output (exit 2);
- any GPU: ours on CUDA against the golden model (exit 0);
- sm_100+: the real comparison against FlashInfer on the synthetic families (exit 0).
"""

import json

import pytest
import torch

from _helpers import require
from megatron_qat.parity import main

pytestmark = pytest.mark.gpu


def _cap():
    return torch.cuda.get_device_capability(0)


def test_flashinfer_refused_below_sm100(capsys):
    if _cap() >= (10, 0):
        pytest.skip(f"GPU is sm_{_cap()[0]}{_cap()[1]}: FlashInfer is supported, nothing to refuse")
    assert main(["--quiet", "--reference", "flashinfer"]) == 2
    err = capsys.readouterr().err
    assert "compiled only for sm_100+" in err and "--reference golden" in err


def test_canary_catches_sm90_garbage(capsys):
    if _cap() >= (10, 0):
        pytest.skip(f"GPU is sm_{_cap()[0]}{_cap()[1]}: the canary is expected to pass there")
    require("flashinfer", "flashinfer not importable: run `source /opt/mqat/env.sh` first")
    assert main(["--quiet", "--reference", "flashinfer", "--allow-unsupported-gpu"]) == 2
    err = capsys.readouterr().err
    print(err)  # shown with -s: what FlashInfer returned on this GPU
    assert "canary" in err


def test_ours_on_cuda_matches_golden(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert main(["--quiet", "--reference", "golden", "--device", "cuda", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert doc["ours"]["device"] == "cuda" and doc["totals"]["code_mismatches"] == 0
    print(capsys.readouterr().out.splitlines()[-1])


@pytest.mark.sm100
def test_flashinfer_real_comparison_on_synthetic(tmp_path, capsys):
    require("flashinfer", "flashinfer not importable: run `source /opt/mqat/env.sh` first")
    path = tmp_path / "r.json"
    code = main(["--quiet", "--reference", "flashinfer", "--json", str(path)])
    out = capsys.readouterr().out
    print(out)
    assert code == 0, out
    doc = json.loads(path.read_text())
    assert doc["reference"]["name"] == "flashinfer" and doc["reference"]["canary"] == "passed"
    assert doc["reference"]["negative_zero_normalised"] is True
