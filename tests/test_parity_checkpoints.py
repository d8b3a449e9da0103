"""megatron-qat parity on small generated checkpoints: HF safetensors (file, directory, index),
torch .pt (nested, Megatron names), planted mismatches, and every bad-input case. The HF fixture
has a config.json (qwen3_moe: fused tensors are transformers-v5 [E, out, in]) and holds skipped
and non-finite tensors on purpose, so a full run over it is INCOMPLETE (exit 3)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from megatron_qat.parity import golden, main

EXPERT = "model.layers.{l}.mlp.experts.{e}.{p}_proj.weight"


def _hf_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {}
    for e in range(2):
        t[EXPERT.format(l=0, e=e, p="gate")] = (torch.randn(16, 64, generator=g) * 0.02).bfloat16()
        t[EXPERT.format(l=0, e=e, p="up")] = (torch.randn(16, 64, generator=g) * 0.02).bfloat16()
        t[EXPERT.format(l=0, e=e, p="down")] = (torch.randn(64, 96, generator=g) * 0.02).half()  # fp16, K=96
    t["model.layers.0.mlp.gate.weight"] = torch.randn(2, 64, generator=g).bfloat16()  # router
    t["model.layers.0.mlp.shared_experts.gate_proj.weight"] = torch.randn(16, 64, generator=g).bfloat16()
    t["model.layers.1.mlp.experts.gate_up_proj"] = (torch.randn(3, 64, 128, generator=g) * 0.02).bfloat16()  # 3-D [E, 2I, H]
    t["model.layers.1.mlp.experts.down_proj"] = (torch.randn(3, 128, 32, generator=g) * 0.02).half()  # [E, H, I]: consistent with gate_up (checked)
    t["model.layers.1.mlp.experts.0.up_proj.weight"] = torch.randint(-8, 8, (4, 64), generator=g, dtype=torch.int8)
    t["model.layers.1.mlp.experts.1.down_proj.weight"] = torch.randn(8, 48, generator=g).bfloat16()  # K % 32
    bad = (torch.randn(8, 64, generator=g) * 0.02).bfloat16()
    bad[3, 7], bad[5, 40], bad[5, 41] = float("nan"), float("inf"), float("-inf")
    t["model.layers.1.mlp.experts.2.gate_proj.weight"] = bad
    return t


SELECTED = 11  # expert tensors matched by the default --include
COMPARED = 9  # minus the int8 one and the K=48 one


def _run(argv, capsys=None):
    code = main(["--quiet", *argv])
    out = capsys.readouterr() if capsys else None
    return code, out


def _json(tmp_path, argv, capsys):
    path = tmp_path / "report.json"
    code, out = _run([*argv, "--json", str(path)], capsys)
    return code, json.loads(path.read_text()), out


@pytest.fixture
def hf_dir(tmp_path):
    tensors = _hf_tensors()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    d = tmp_path / "hf"
    d.mkdir()
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(d / shard))
        weight_map.update({k: shard for k in keys})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]}))
    return d


def test_hf_directory_reports_every_expert_tensor(hf_dir, tmp_path, capsys):
    code, doc, out = _json(tmp_path, ["--reference", "golden", str(hf_dir)], capsys)
    assert code == 3 and doc["status"] == "incomplete" and doc["exit_code"] == 3, out.out + out.err
    assert doc["layout"] == {"family": "qwen3_moe", "source": str(hf_dir / "config.json"), "note": None}
    names = {t["name"] for t in doc["tensors"]}
    assert len(names) == SELECTED
    assert "model.layers.0.mlp.gate.weight" not in names
    assert not any("shared_experts" in n for n in names)
    by = {t["name"]: t for t in doc["tensors"]}
    assert by["model.layers.1.mlp.experts.1.down_proj.weight"]["status"] == "skipped: K=48 not a multiple of 32"
    assert by["model.layers.1.mlp.experts.0.up_proj.weight"]["status"] == "skipped: non-floating dtype I8"
    fused = by["model.layers.1.mlp.experts.gate_up_proj"]
    assert fused["status"] == "equal" and fused["rows_compared"] == 3 * 64 and fused["elements_compared"] == 3 * 64 * 128
    assert fused["layout"]["blocked_dim"] == 2 and fused["layout"]["role"] == "gate_up" and fused["complete"]
    nonfinite = by["model.layers.1.mlp.experts.2.gate_proj.weight"]
    assert (nonfinite["nonfinite_values"], nonfinite["excluded_rows"], nonfinite["rows_compared"]) == (3, 2, 6)
    assert doc["totals"]["tensors_compared"] == COMPARED and doc["totals"]["tensors_skipped"] == 2
    summary = out.out.strip().splitlines()[-1]
    assert summary.startswith("PARITY INCOMPLETE") and "2 tensor(s) skipped" in summary and "2 row(s) holding non-finite values" in summary
    assert "skipped: K=48 not a multiple of 32" in out.out


def test_file_index_and_directory_agree(hf_dir, tmp_path, capsys):
    _, by_dir, _ = _json(tmp_path, ["--reference", "golden", str(hf_dir)], capsys)
    _, by_index, _ = _json(tmp_path, ["--reference", "golden", str(hf_dir / "model.safetensors.index.json")], capsys)
    shards = sorted(str(p) for p in hf_dir.glob("*.safetensors"))
    _, by_files, _ = _json(tmp_path, ["--reference", "golden", *shards], capsys)
    key = lambda doc: sorted((t["name"], t["status"], t["elements_compared"]) for t in doc["tensors"])  # noqa: E731
    assert key(by_dir) == key(by_index) == key(by_files)


def test_torch_pt_nested_megatron_names(tmp_path, capsys):
    g = torch.Generator().manual_seed(3)
    layer = "decoder.layers.0.mlp"
    model = {
        f"{layer}.experts.linear_fc1.weight0": torch.randn(32, 64, generator=g).bfloat16(),
        f"{layer}.experts.linear_fc1.weight1": torch.randn(32, 64, generator=g).bfloat16(),
        f"{layer}.experts.linear_fc2.weight0": torch.randn(64, 32, generator=g).half(),
        f"{layer}.router.weight": torch.randn(2, 64, generator=g).bfloat16(),
        f"{layer}.shared_experts.linear_fc1.weight": torch.randn(32, 64, generator=g).bfloat16(),
    }
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"model": model, "iteration": 7, "checkpoint_version": 3.0}, path)
    code, doc, out = _json(tmp_path, ["--reference", "golden", str(path)], capsys)
    assert code == 0, out.err
    assert sorted(t["name"] for t in doc["tensors"]) == sorted(f"model.{k}" for k in model if "experts.linear" in k and "shared" not in k)
    assert any("non-tensor" in n for n in doc["notes"])


class OpaqueArgs:
    """A pickled object that no torch.load allowlist knows. (argparse.Namespace would not do:
    megatron-core allowlists it with torch.serialization.add_safe_globals once imported.)"""

    def __init__(self, lr):
        self.lr = lr


def test_torch_pickle_needs_trust_flag(tmp_path, capsys):
    path = tmp_path / "ckpt.pt"
    torch.save({"args": OpaqueArgs(lr=1.0), "model": {"x.experts.linear_fc1.weight0": torch.ones(4, 32).bfloat16()}}, path)
    code, out = _run(["--reference", "golden", str(path)], capsys)
    assert code == 2 and str(path) in out.err and "--trust-pickle" in out.err
    code, out = _run(["--reference", "golden", "--trust-pickle", str(path)], capsys)
    assert code == 0, out.err


def test_reads_row_chunks_through_get_slice(hf_dir, tmp_path, capsys, monkeypatch):
    """Never a whole tensor: every read is a get_slice of at most chunk_elements / K rows."""
    import safetensors

    real_open = safetensors.safe_open
    reads = []

    class Recorder:
        def __init__(self, *a, **kw):
            self._h = real_open(*a, **kw)

        def keys(self):
            return self._h.keys()

        def get_tensor(self, name):
            raise AssertionError(f"get_tensor({name}) loads a whole tensor")

        def get_slice(self, name):
            sl = self._h.get_slice(name)

            class Slice:
                get_shape, get_dtype = sl.get_shape, sl.get_dtype

                def __getitem__(self, idx):
                    t = sl[idx]
                    reads.append((name, t.numel()))
                    return t

            return Slice()

    monkeypatch.setattr(safetensors, "safe_open", Recorder)
    code, doc, _ = _json(tmp_path, ["--reference", "golden", "--allow-incomplete", "--chunk-elements", "128", str(hf_dir)], capsys)
    assert code == 0
    assert reads and max(n for _, n in reads) <= 128
    fused = [n for name, n in reads if name.endswith("gate_up_proj")]
    assert len(fused) == 3 * 64 and sum(fused) == 3 * 64 * 128  # one 128-wide row per read, never crossing experts


def test_limit_and_sample_rows(hf_dir, tmp_path, capsys):
    code, doc, _ = _json(tmp_path, ["--reference", "golden", "--allow-incomplete", "--limit", "2", str(hf_dir)], capsys)
    assert code == 0 and len(doc["tensors"]) == 2
    code, doc, _ = _json(tmp_path, ["--reference", "golden", "--allow-incomplete", "--sample-rows", "3", str(hf_dir)], capsys)
    assert code == 0 and doc["sampled"]
    for t in doc["tensors"]:
        if t["status"] == "equal" and "2.gate_proj" not in t["name"]:
            assert t["rows_compared"] == 3, t


def _plant_golden_code_flip(monkeypatch, k, row, col):
    """The golden flips the sign bit of one code in the first batch whose K equals ``k``."""
    original = golden.quantize
    done = []

    def flipped(x, **rule):
        codes, scales = original(x, **rule)
        if x.shape[1] == k and not done:
            codes = codes.copy()
            codes[row, col // 2] ^= 0x8 << (4 * (col % 2))
            done.append(True)
        return codes, scales

    monkeypatch.setattr(golden, "quantize", flipped)


def test_planted_code_mismatch_exits_1_and_is_located(hf_dir, tmp_path, capsys, monkeypatch):
    _plant_golden_code_flip(monkeypatch, k=96, row=5, col=17)
    code, doc, out = _json(tmp_path, ["--reference", "golden", str(hf_dir)], capsys)
    assert code == 1 and doc["status"] == "mismatch" and doc["exit_code"] == 1
    bad = [t for t in doc["tensors"] if t["status"] == "mismatch"]
    assert len(bad) == 1 and bad[0]["name"] == EXPERT.format(l=0, e=0, p="down")
    t = bad[0]
    assert (t["code_mismatches"], t["scale_mismatches"], t["value_mismatches"], t["dequant_mismatches"]) == (1, 0, 1, 1)
    m = t["first_mismatch"]
    assert (m["row"], m["col"], m["index"], m["block"]) == (5, 17, [5, 17], 0)
    assert m["ours_code"] ^ m["ref_code"] == 0x8 and set(m["differs_in"]) == {"code", "value", "dequant"}
    assert "PARITY MISMATCH" in out.out and "first mismatch in " + t["name"] in out.out


def test_planted_scale_mismatch_in_ours(hf_dir, tmp_path, capsys, monkeypatch):
    from megatron_qat import mxfp4

    original = mxfp4.quantize
    done = []

    def bumped(x, block_size=32, **kwargs):
        codes, scales = original(x, block_size, **kwargs)
        if x.shape[-1] == 128 and not done:  # the fused 3-D tensor [3, 64, 128]: row 2 of expert 0
            scales = scales.clone()
            scales[2, 1] += 1
            done.append(True)
        return codes, scales

    monkeypatch.setattr(mxfp4, "quantize", bumped)
    code, doc, _ = _json(tmp_path, ["--reference", "golden", str(hf_dir)], capsys)
    assert code == 1
    (t,) = [t for t in doc["tensors"] if t["status"] == "mismatch"]
    assert t["name"] == "model.layers.1.mlp.experts.gate_up_proj"
    assert (t["scale_mismatches"], t["code_mismatches"], t["value_mismatches"]) == (1, 0, 0)
    assert t["dequant_mismatches"] > 0 and t["max_abs_diff"] > 0
    assert t["first_mismatch"]["index"][:2] == [0, 2] and t["first_mismatch"]["block"] == 1


def test_corrupt_and_truncated_safetensors_exit_2_naming_the_file(hf_dir, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\xff" * 64)
    code, out = _run(["--reference", "golden", str(corrupt)], capsys)
    assert code == 2 and str(corrupt) in out.err and "header" in out.err
    shard = sorted(hf_dir.glob("*.safetensors"))[0]
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(shard.read_bytes()[:-100])
    code, out = _run(["--reference", "golden", str(truncated)], capsys)
    assert code == 2 and str(truncated) in out.err


def test_path_errors_exit_2(hf_dir, tmp_path, capsys):
    cases = {
        str(tmp_path / "missing.safetensors"): "no such file",
        str(tmp_path / "notes.txt"): "unsupported file type",
    }
    (tmp_path / "notes.txt").write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases[str(empty)] = "no checkpoint found"
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "__0_0.distcp").write_bytes(b"")
    cases[str(dist)] = "distributed"
    index = hf_dir / "model.safetensors.index.json"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors.index.json").write_text(index.read_text())
    cases[str(broken)] = "not found"
    for path, message in cases.items():
        code, out = _run(["--reference", "golden", path], capsys)
        assert code == 2 and message in out.err, (path, out.err)


def test_usage_errors_exit_2(hf_dir, capsys):
    for argv, message in [
        (["--limit", "0"], "--limit=0"),
        (["--include", "(", str(hf_dir)], "not a valid regular expression"),
        (["--include", "nothing_like_this", str(hf_dir)], "matches --include"),
        (["--synthetic", str(hf_dir)], "takes no PATH"),
        (["--allow-unsupported-gpu"], "only applies to --reference flashinfer"),
    ]:
        code, out = _run(argv, capsys)
        assert code == 2 and message in out.err, (argv, out.err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_flashinfer_without_gpu_exits_2(capsys):
    code, out = _run(["--reference", "flashinfer"], capsys)
    assert code == 2 and "needs a CUDA GPU" in out.err and "--reference golden" in out.err
    code, out = _run(["--device", "cuda"], capsys)
    assert code == 2 and "--device cuda" in out.err


def test_all_selected_skipped_exits_3_even_when_incomplete_is_allowed(tmp_path, capsys):
    path = tmp_path / "odd.safetensors"
    save_file({"m.experts.0.up_proj.weight": torch.ones(4, 40).bfloat16()}, str(path))
    for extra in ([], ["--allow-incomplete"]):
        code, out = _run(["--reference", "golden", *extra, str(path)], capsys)
        assert code == 3 and "PARITY NOT RUN (INCOMPLETE)" in out.out and "K=40" in out.out
