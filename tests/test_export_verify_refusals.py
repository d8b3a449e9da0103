"""``parity DST --source SRC`` / ``export --verify`` refuse what the export refuses, and the export
never leaves a half-written --out (issue 10 item 4; issue 8 item 6's exit codes).

- a quantized "source" (e.g. the export itself) used to pass, ``EXPORT PARITY OK: 0 expert
  tensor(s)`` exit 0: every MXFP4 tensor was "copied" and byte-identical to itself;
- a source family the destination's format cannot name (``--layout qwen3_moe`` against a gpt-oss
  export) ended in a KeyError traceback;
- an OSError while writing (unwritable --out parent, disk full) ended in a traceback; a Ctrl-C
  mid-way leaves neither --out nor the temporary directory.
Checkpoints are tiny real models saved by transformers 5.x (tests/_tiny_hf.py).
"""

import errno
import os

import pytest

from _helpers import one_line_error, require
from megatron_qat.cli import main

require("transformers", "transformers>=5 is a test dependency ([export] extra)", minversion="5.0")

import _tiny_hf  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    src = tmp_path_factory.mktemp("gpt_oss_src")
    _tiny_hf.build("gpt_oss", src)
    qsrc = tmp_path_factory.mktemp("qwen3_src")
    _tiny_hf.build("qwen3_moe", qsrc)
    dst = tmp_path_factory.mktemp("out") / "gpt_oss_mxfp4"
    assert main(["export", str(src), "--format", "gpt-oss", "--out", str(dst), "--no-progress"]) == 0
    return str(src), str(qsrc), str(dst)


def test_export_used_as_its_own_source_is_refused_not_ok(exported, capsys):
    _, _, dst = exported
    assert main(["parity", dst, "--source", dst]) == 2
    one_line_error(capsys.readouterr().err, "parity", "already quantized", "mxfp4")
    assert main(["export", "--verify", dst, "--source", dst]) == 2
    one_line_error(capsys.readouterr().err, "export", "already quantized")


def test_source_family_the_format_cannot_name_is_one_line_exit_2(exported, capsys):
    _, qsrc, dst = exported
    assert main(["parity", dst, "--source", qsrc, "--layout", "qwen3_moe"]) == 2
    one_line_error(capsys.readouterr().err, "parity", "gpt-oss", "qwen3_moe")
    assert main(["export", "--verify", dst, "--source", qsrc]) == 2
    one_line_error(capsys.readouterr().err, "export", "gpt_oss", "qwen3_moe")


def test_right_source_still_verifies(exported, capsys):
    src, _, dst = exported
    assert main(["parity", dst, "--source", src]) == 0
    assert "EXPORT PARITY OK: 2 expert tensor(s)" in capsys.readouterr().out


def test_write_error_is_one_line_and_leaves_nothing(exported, tmp_path, capsys, monkeypatch):
    from megatron_qat.export import checkpoint

    src, _, _ = exported

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(self.tmp, "part-00000.safetensors"))

    monkeypatch.setattr(checkpoint.ShardWriter, "flush", full)
    out = tmp_path / "o"
    assert main(["export", src, "--format", "gpt-oss", "--out", str(out), "--no-progress"]) == 2
    one_line_error(capsys.readouterr().err, "export", "No space left on device", "nothing written")
    assert os.listdir(tmp_path) == []


def test_ctrl_c_mid_way_leaves_nothing(exported, tmp_path, monkeypatch):
    from megatron_qat.export import offline

    src, _, _ = exported
    real = offline.convert_tensor
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # after the first expert tensor is written into the temporary dir
            raise KeyboardInterrupt
        yield from real(*a, **k)

    monkeypatch.setattr(offline, "convert_tensor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["export", src, "--format", "gpt-oss", "--out", str(tmp_path / "o"), "--no-progress"])
    assert os.listdir(tmp_path) == [] and len(calls) == 2


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux /proc (a directory in which nobody can create a file)")
def test_unwritable_out_parent_is_one_line(exported, capsys):
    src, _, _ = exported
    assert main(["export", src, "--format", "gpt-oss", "--out", "/proc/megatron_qat_out", "--no-progress"]) == 2
    one_line_error(capsys.readouterr().err, "export", "/proc/megatron_qat_out", "nothing written")
