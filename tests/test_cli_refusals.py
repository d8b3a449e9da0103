"""Issue 17: a new user's mistakes end in ONE line on stderr and exit 2, never a traceback and never
exit 1 (in ``parity DST --source SRC`` / ``export --verify`` mode, 1 means "a difference" only).

Each case runs in-process through ``megatron_qat.cli.main`` (the exit code it returns, what it
prints) and a representative of each row also in a real ``python -m megatron_qat.cli`` process.
Checkpoints are hand-made Qwen3-MoE-named ones (tests/_tiny_hf.py ``write_per_expert``) or tiny
real models saved by transformers 5.x where a loader's layout matters.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

import _tiny_hf
from _helpers import cli_env, one_line_error, run_cli
from megatron_qat.cli import main

# ways a .safetensors file is broken on disk (each refused by safetensors' header check)
CORRUPTIONS = {
    "truncated": lambda data: data[:-100],
    "garbage": lambda data: bytes((i * 131 + 7) % 256 for i in range(len(data))),
    "bad-header": lambda data: data[:8] + b"x" + data[9:],
    "empty": lambda data: b"",
}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("src") / "qwen3"
    _tiny_hf.write_per_expert(d)
    return d


@pytest.fixture(scope="module")
def dst(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "qwen3_mxfp4"
    assert main(["export", str(src), "--format", "compressed-tensors", "--out", str(out), "--no-progress"]) == 0
    return out


def _corrupt_copy(directory, how, where):
    shutil.copytree(directory, where)
    shard = where / "model.safetensors"
    shard.write_bytes(CORRUPTIONS[how](shard.read_bytes()))
    return where


def _refused(capsys, command, argv, *needles):
    assert main(argv) == 2
    out = capsys.readouterr()
    return one_line_error(out.err, command, *needles)


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_corrupt_source_into_export(src, tmp_path, capsys, how):
    bad = _corrupt_copy(src, how, tmp_path / "bad")
    _refused(capsys, "export", ["export", str(bad), "--format", "compressed-tensors", "--out", str(tmp_path / "o"), "--no-progress"],
             str(bad / "model.safetensors"), "safetensors")
    assert sorted(os.listdir(tmp_path)) == ["bad"]


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_corrupt_source_into_parity_source_mode(src, dst, tmp_path, capsys, how):
    bad = _corrupt_copy(src, how, tmp_path / "bad")
    _refused(capsys, "parity", ["parity", str(dst), "--source", str(bad)], str(bad / "model.safetensors"))


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_corrupt_export_into_verify(src, dst, tmp_path, capsys, how):
    bad = _corrupt_copy(dst, how, tmp_path / "bad")
    _refused(capsys, "export", ["export", "--verify", str(bad), "--source", str(src)], str(bad / "model.safetensors"))
    _refused(capsys, "parity", ["parity", str(bad), "--source", str(src)], str(bad / "model.safetensors"))


def test_corrupt_files_in_real_processes(src, dst, tmp_path):
    bad_src = _corrupt_copy(src, "truncated", tmp_path / "bad_src")
    bad_dst = _corrupt_copy(dst, "bad-header", tmp_path / "bad_dst")
    for command, argv, named in (
        ("export", ["export", bad_src, "--format", "compressed-tensors", "--out", tmp_path / "o"], bad_src),
        ("parity", ["parity", dst, "--source", bad_src], bad_src),
        ("export", ["export", "--verify", bad_dst, "--source", src], bad_dst),
    ):
        r = run_cli(*argv)
        assert r.returncode == 2, (argv, r.returncode, r.stderr)
        one_line_error(r.stderr, command, str(named / "model.safetensors"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("device", ["gpu", "meta", "cuda:x", ""], ids=["word-gpu", "meta", "cuda-x", "empty"])
def test_bad_device_is_one_line(src, tmp_path, capsys, device):
    _refused(capsys, "export", ["export", str(src), "--format", "compressed-tensors", "--out", str(tmp_path / "o"), "--device", device],
             "--device", "cpu", "cuda")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("size", ["nan", "inf", "-inf", "0", "-1", "1e400", "two"])
def test_bad_max_shard_gib_is_one_line(src, tmp_path, capsys, size):
    _refused(capsys, "export", ["export", str(src), "--format", "compressed-tensors", "--out", str(tmp_path / "o"), f"--max-shard-gib={size}"],
             "--max-shard-gib", "positive")
    assert not os.listdir(tmp_path)


def test_bad_device_and_shard_size_in_real_processes(src, tmp_path):
    for extra, needle in ((["--device", "gpu"], "--device"), (["--max-shard-gib", "nan"], "--max-shard-gib")):
        r = run_cli("export", src, "--format", "compressed-tensors", "--out", tmp_path / "o", *extra)
        assert r.returncode == 2, r.stderr
        one_line_error(r.stderr, "export", needle)
    assert not os.listdir(tmp_path)


def test_misspelt_kernel_value_in_export_is_one_line_like_parity(src, tmp_path):
    env = cli_env(MEGATRON_QAT_KERNEL="refernce")
    r = run_cli("export", src, "--format", "compressed-tensors", "--out", tmp_path / "o", "--no-progress", env=env)
    assert r.returncode == 2, r.stderr
    one_line_error(r.stderr, "export", "MEGATRON_QAT_KERNEL='refernce'", '"reference", "triton"')
    r = run_cli("parity", "--quiet", env=env)
    assert r.returncode == 2
    one_line_error(r.stderr, "parity", "MEGATRON_QAT_KERNEL='refernce'")
    assert not os.listdir(tmp_path)


def test_misspelt_variable_name_in_either_command_names_the_closest(src, tmp_path):
    env = cli_env(MEGATRON_QAT_KERNAL="triton")
    for argv, command in ((["export", src, "--format", "compressed-tensors", "--out", tmp_path / "o"], "export"), (["parity", "--quiet"], "parity")):
        r = run_cli(*argv, env=env)
        assert r.returncode == 2, r.stderr
        one_line_error(r.stderr, command, "MEGATRON_QAT_KERNAL", "did you mean MEGATRON_QAT_KERNEL")


# ------------------------------------------------------------------ messages that say what to do
def test_missing_path_and_wrong_file_type_are_told_apart(src, tmp_path, capsys):
    out = str(tmp_path / "o")
    _refused(capsys, "export", ["export", str(tmp_path / "nowhere"), "--format", "gpt-oss", "--out", out], "nowhere", "no such file or directory")
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    line = _refused(capsys, "export", ["export", str(notes), "--format", "gpt-oss", "--out", out], "notes.txt", "not a safetensors checkpoint")
    assert "no such file" not in line


def test_out_parent_that_is_a_file(src, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    line = _refused(capsys, "export", ["export", str(src), "--format", "compressed-tensors", "--out", str(tmp_path / "file" / "o")],
                    str(tmp_path / "file"), "not a directory")
    assert "does not exist" not in line


def test_family_origin_is_named_truthfully(src, tmp_path, capsys):
    out = str(tmp_path / "o")
    line = _refused(capsys, "export", ["export", str(src), "--format", "gpt-oss", "--out", out], "qwen3_moe", "config.json", "--format compressed-tensors")
    line = _refused(capsys, "export", ["export", str(src), "--format", "gpt-oss", "--layout", "qwen3_moe", "--out", out],
                    "qwen3_moe", "--layout", "--format compressed-tensors")
    assert "config.json" not in line


def test_parity_on_an_export_is_short_and_points_to_source(dst, capsys):
    line = _refused(capsys, "parity", ["parity", "--quiet", str(dst)], "--source")
    assert len(line) < 300 and "(?:" not in line  # not the default --include regex


def test_swapped_path_and_source_get_a_hint(src, dst, capsys):
    line = _refused(capsys, "parity", ["parity", str(src), "--source", str(dst)], "swapped", f"parity {dst} --source {src}")
    assert "Traceback" not in line
    _refused(capsys, "export", ["export", "--verify", str(src), "--source", str(dst)], "swapped", f"--verify {dst} --source {src}")


def test_llama4_is_not_sent_in_a_circle(tmp_path, capsys):
    from _helpers import require

    require("transformers", "transformers>=5 is a test dependency ([export] extra)", minversion="5.0")
    src = tmp_path / "llama4"
    _tiny_hf.build("llama4", src)
    capsys.readouterr()  # transformers' own save progress
    out = str(tmp_path / "o")
    gpt = _refused(capsys, "export", ["export", str(src), "--format", "gpt-oss", "--out", out], "llama4")
    ct = _refused(capsys, "export", ["export", str(src), "--format", "compressed-tensors", "--out", out], "llama4")
    assert "use --format compressed-tensors" not in gpt and "use --format gpt-oss" not in ct
    assert "no MXFP4 export format" in gpt and "no MXFP4 export format" in ct
    assert json.loads((src / "config.json").read_text())["model_type"].startswith("llama4")


def test_offline_export_refuses_a_training_block_size_no_engine_loads(src, tmp_path):
    r = run_cli("export", src, "--format", "compressed-tensors", "--out", tmp_path / "o", "--no-progress",
                env=cli_env(OPEN_TRAINING_MXFP4_BLOCK_SIZE="16"))
    assert r.returncode == 2, r.stderr
    one_line_error(r.stderr, "export", "blocks of 32", "OPEN_TRAINING_MXFP4_BLOCK_SIZE", "16")
    assert not os.listdir(tmp_path)
