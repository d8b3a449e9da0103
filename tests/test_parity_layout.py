"""Layout-aware parity (issue 8, item 5) on real tiny checkpoints written by transformers 5.x:
blocks run along in_features, the family comes from config.json or --layout, the report says
which dim was blocked, and a fused tensor of unknown layout is refused, never guessed."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import _tiny_hf
from megatron_qat import mxfp4
from megatron_qat.parity import golden, main

GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"
DOWN = "model.layers.0.mlp.experts.down_proj"


@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt_oss")
    _tiny_hf.build("gpt_oss", d)
    return d


def _run_json(tmp_path, argv, capsys):
    path = tmp_path / "report.json"
    code = main(["--quiet", "--reference", "golden", "--json", str(path), *argv])
    out = capsys.readouterr()
    return code, (json.loads(path.read_text()) if path.exists() else None), out


def _record_golden_inputs(monkeypatch):
    seen = []
    original = golden.quantize

    def recording(x, **rule):
        seen.append(x.copy())
        return original(x, **rule)

    monkeypatch.setattr(golden, "quantize", recording)
    return seen


def test_gpt_oss_blocks_along_in_features_not_the_last_stored_dim(gpt_oss_dir, tmp_path, capsys, monkeypatch):
    """Regression: parity used to block the last stored dim of gpt-oss ``gate_up_proj [E, hidden, 2I]``
    (out_features) and print PARITY OK. Now the rows it compares are the transposed tensor's rows,
    the report says blocked dim 1, and blocking the last dim would have given other values."""
    seen = _record_golden_inputs(monkeypatch)
    code, doc, out = _run_json(tmp_path, [str(gpt_oss_dir), "--include", "gate_up_proj$"], capsys)
    assert code == 0, out.err
    with safe_open(str(gpt_oss_dir / "model.safetensors"), "pt") as h:
        stored = h.get_tensor(GATE_UP)
    in_features_rows = stored.transpose(1, 2).reshape(-1, 64)  # [E*2I, hidden]
    compared = torch.from_numpy(np.concatenate(seen)).to(torch.bfloat16)
    assert torch.equal(compared.view(torch.int16), in_features_rows.view(torch.int16))

    assert doc["layout"]["family"] == "gpt_oss" and doc["layout"]["source"].endswith("config.json")
    (t,) = doc["tensors"]
    assert t["name"] == GATE_UP and t["shape"] == [4, 64, 192]
    assert t["layout"] == {"family": "gpt_oss", "role": "gate_up", "blocked_dim": 1, "expert_dim": 0, "glu": "interleaved", "rule": "layout table"}
    assert t["blocked_shape"] == [4, 192, 64] and t["rows_compared"] == 4 * 192 and t["complete"]
    assert "dim1 gpt_oss:gate_up" in out.out

    # What the old code compared (blocks along the stored last dim) is a different quantization:
    along_in = mxfp4.fake_quantize(stored.transpose(1, 2).contiguous()).transpose(1, 2)
    along_last = mxfp4.fake_quantize(stored)
    differ = (along_in.view(torch.int16) != along_last.view(torch.int16)).float().mean().item()
    assert differ > 0.01, differ


def test_gpt_oss_first_mismatch_index_is_in_stored_coordinates(gpt_oss_dir, tmp_path, capsys, monkeypatch):
    original = golden.quantize
    done = []

    def flipped(x, **rule):  # flip one code at row 5, col 17 of the first gate_up batch (K = hidden = 64)
        codes, scales = original(x, **rule)
        if x.shape[1] == 64 and not done:
            codes = codes.copy()
            codes[5, 17 // 2] ^= 0x8 << 4
            done.append(True)
        return codes, scales

    monkeypatch.setattr(golden, "quantize", flipped)
    code, doc, _ = _run_json(tmp_path, [str(gpt_oss_dir)], capsys)
    assert code == 1
    (t,) = [t for t in doc["tensors"] if t["status"] == "mismatch"]
    m = t["first_mismatch"]
    assert t["name"] == GATE_UP and (m["row"], m["col"]) == (5, 17)
    assert m["index"] == [0, 17, 5]  # expert 0, in_features 17, out_features 5 of the stored [E, in, out]


def test_fused_tensor_without_family_is_refused_naming_layout(gpt_oss_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((gpt_oss_dir / "model.safetensors").read_bytes())  # no config.json
    code, doc, out = _run_json(tmp_path, [str(bare)], capsys)
    assert code == 2 and out.out == ""
    err = out.err.strip().splitlines()
    assert len(err) == 1 and "--layout" in err[0] and ("gate_up_proj" in err[0] or "down_proj" in err[0])
    assert doc["status"] == "error" and doc["exit_code"] == 2 and "--layout" in doc["error"]
    code, doc, _ = _run_json(tmp_path, [str(bare), "--layout", "gpt_oss"], capsys)
    assert code == 0 and doc["layout"]["source"] == "--layout"
    assert {t["layout"]["blocked_dim"] for t in doc["tensors"]} == {1}


def test_v5_fused_dump_blocks_the_last_dim_and_layout_overrides_config(tmp_path, capsys):
    """A raw state_dict dump of transformers-v5 Qwen3-MoE stores fused [E, 2I, H]: in_features last."""
    d = tmp_path / "qwen"
    model = _tiny_hf.build("qwen3_moe", d)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if ".experts." in k}
    (d / "model.safetensors").unlink()
    save_file(sd, str(d / "model.safetensors"))
    code, doc, out = _run_json(tmp_path, [str(d)], capsys)
    assert code == 0, out.err
    by = {t["name"]: t for t in doc["tensors"]}
    assert by[GATE_UP]["layout"]["blocked_dim"] == 2 and by[GATE_UP]["layout"]["glu"] == "concat"
    assert by[GATE_UP]["blocked_shape"] == by[GATE_UP]["shape"] == [4, 64, 64]
    code, doc, _ = _run_json(tmp_path, [str(d), "--layout", "mixtral"], capsys)  # the user's word wins, noted
    assert code == 0 and any("--layout mixtral overrides" in n for n in doc["notes"])
    assert {t["layout"]["blocked_dim"] for t in doc["tensors"]} == {2}
    # ... unless the config's family stores its fused tensors otherwise: gpt_oss would block [E, 2I, H] along 2I
    code, doc, out = _run_json(tmp_path, [str(d), "--layout", "gpt_oss"], capsys)
    assert code == 2 and "--layout gpt_oss contradicts" in out.err and "qwen3_moe" in out.err and doc["exit_code"] == 2
    (d / "config.json").unlink()  # no config: the shapes still contradict it (tests/test_parity_wrong_layout.py)
    code, doc, out = _run_json(tmp_path, [str(d), "--layout", "gpt_oss"], capsys)
    assert code == 2 and "contradict family gpt_oss" in out.err and doc["exit_code"] == 2


def test_unknown_config_family_checks_per_expert_but_refuses_fused(tmp_path, capsys):
    d = tmp_path / "olmoe"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"]}))
    t = {"model.layers.0.mlp.experts.0.up_proj.weight": (torch.randn(32, 64) * 0.02).bfloat16()}
    save_file(t, str(d / "model.safetensors"))
    code, doc, _ = _run_json(tmp_path, [str(d)], capsys)
    assert code == 0 and doc["layout"]["family"] is None and "not a known checkpoint family" in doc["layout"]["note"]
    assert doc["tensors"][0]["layout"]["rule"] == "per-expert nn.Linear [out, in]"
    t[DOWN] = (torch.randn(4, 64, 32) * 0.02).bfloat16()
    save_file(t, str(d / "model.safetensors"))
    code, doc, out = _run_json(tmp_path, [str(d)], capsys)
    assert code == 2 and "--layout" in out.err and "olmoe" in out.err


def test_tensor_outside_the_table_is_refused_not_guessed(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    save_file({"blocks.0.mix": torch.zeros(2, 32, 64).bfloat16(), "blocks.0.proj.weight": torch.zeros(32, 64).bfloat16()}, str(path))
    code, _, out = _run_json(tmp_path, [str(path), "--include", "mix"], capsys)
    assert code == 2 and "not a routed-expert tensor of the layout table" in out.err
    code, doc, _ = _run_json(tmp_path, [str(path), "--include", r"proj\.weight"], capsys)
    assert code == 0 and doc["tensors"][0]["layout"]["rule"] == "nn.Linear [out, in]"


def test_layout_flag_rejects_unknown_family_and_synthetic(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--layout", "qwen4"])
    assert exc.value.code == 2 and "gpt_oss" in capsys.readouterr().err
    assert main(["--quiet", "--layout", "gpt_oss"]) == 2
    assert "--layout gpt_oss applies to checkpoints" in capsys.readouterr().err
