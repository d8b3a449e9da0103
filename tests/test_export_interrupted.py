"""Issue 17: nothing half-written survives an export that does not finish, whatever ends it, and the
output is a normal directory.

Real processes and real OS events, nothing of ours mocked:
- a full disk: ``ulimit -f`` (the kernel refuses the write with EFBIG) and, where user namespaces
  allow it, a 64 KiB tmpfs (ENOSPC);
- SIGTERM (``timeout``, Slurm, Kubernetes), SIGHUP (a closed SSH session) and SIGINT (Ctrl-C),
  sent while the ``DST.partial-*`` directory exists (the exporter is held with SIGSTOP first, so
  the signal lands mid-export however fast the machine is);
- two exports to one ``--out``: the first is held mid-export while the second finishes;
- the umask (``tempfile.mkdtemp`` made every export 0700);
- an error during an export whose progress line is drawn on a real terminal (a pty).
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import stat
import subprocess
import time

import pytest

import _tiny_hf
from _helpers import cli_command, cli_env, one_line_error, run_cli
from megatron_qat.cli import main

EXPORT = ("--format", "compressed-tensors")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """Big enough that a shard exceeds a few KiB and an export takes a while (12 tensors 128 x 256)."""
    d = tmp_path_factory.mktemp("src") / "qwen3"
    _tiny_hf.write_per_expert(d, experts=4, hidden=256, inter=128)
    (d / "tokenizer.json").write_text("{}")
    return d


def _leftovers(parent, name):
    return sorted(n for n in os.listdir(parent) if n.startswith(name + ".partial"))


def _start(src, out, *extra):
    return subprocess.Popen(cli_command("export", src, *EXPORT, "--out", out, *extra), env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _hold_mid_export(proc, out, timeout=240.0):
    """Wait until ``proc`` has created ``OUT.partial-*``, then SIGSTOP it; returns the partial dir."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _leftovers(out.parent, out.name)
        if found:
            os.kill(proc.pid, signal.SIGSTOP)
            assert not out.exists(), "the export finished before it could be held"
            return out.parent / found[0]
        if proc.poll() is not None:
            raise AssertionError(f"export ended ({proc.returncode}) before creating its partial dir: {proc.communicate()}")
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("no partial directory appeared")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_signal_mid_export_leaves_nothing(src, tmp_path, sig):
    out = tmp_path / "out"
    proc = _start(src, out, "--no-progress")
    partial = _hold_mid_export(proc, out)
    assert partial.is_dir()
    os.kill(proc.pid, sig)
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == -sig, (proc.returncode, err)  # ends by the signal it got (shell: 128 + N)
    one_line_error(err, "export", f"interrupted by {sig.name}", "nothing written", str(out))
    assert os.listdir(tmp_path) == []


def test_two_exports_to_one_out_the_loser_leaves_nothing(src, tmp_path):
    out = tmp_path / "out"
    first = _start(src, out, "--no-progress")
    _hold_mid_export(first, out)
    second = run_cli("export", src, *EXPORT, "--out", out, "--no-progress")
    assert second.returncode == 0, second.stderr
    os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=240)
    assert first.returncode == 2, err
    one_line_error(err, "export", str(out), "another process", "nothing of this export")
    assert os.listdir(tmp_path) == ["out"]
    assert main(["export", "--verify", str(out), "--source", str(src)]) == 0  # the winner's output, intact


def test_file_size_limit_is_one_line_and_leaves_nothing(src, tmp_path):
    out = tmp_path / "out"
    argv = cli_command("export", src, *EXPORT, "--out", out, "--no-progress")
    r = subprocess.run(["bash", "-c", 'ulimit -f 8 && exec "$@"', "bash", *argv], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    one_line_error(r.stderr, "export", "File too large", "nothing written")
    assert os.listdir(tmp_path) == []


def test_parity_report_onto_a_full_disk_leaves_no_temporary_file(tmp_path):
    report = tmp_path / "r.json"
    argv = cli_command("parity", "--quiet", "--json", report)
    r = subprocess.run(["bash", "-c", 'ulimit -f 4 && exec "$@"', "bash", *argv], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    one_line_error(r.stderr, "parity", str(report), "File too large")
    assert os.listdir(tmp_path) == ["r.json"]  # the (small) error report; no temporary file
    doc = json.loads(report.read_text())
    assert (doc["status"], doc["exit_code"]) == ("error", 2) and "File too large" in doc["error"]


def _user_namespaces() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _user_namespaces(), reason="needs unshare -rm (user + mount namespaces) to mount a small tmpfs")
def test_full_tmpfs_is_one_line_and_leaves_nothing(src, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "out"
    argv = cli_command("export", src, *EXPORT, "--out", out, "--no-progress")
    script = f'mount -t tmpfs -o size=64k tmpfs "{disk}" && "$@"; rc=$?; ls -A "{disk}" >&2; exit $rc'
    r = subprocess.run(["unshare", "-rm", "bash", "-c", script, "bash", *argv], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    one_line_error(r.stderr, "export", "No space left on device", "nothing written")  # `ls -A` of the tmpfs printed nothing


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_output_honours_the_umask(src, tmp_path, mask):
    out = tmp_path / "out"
    old = os.umask(mask)
    try:
        assert main(["export", str(src), *EXPORT, "--out", str(out), "--no-progress"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    files = sorted(os.listdir(out))
    assert files == ["config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json"]
    for name in files:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~mask, name


def test_error_during_export_with_progress_on_a_terminal_starts_on_its_own_line(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    tensors = _tiny_hf.write_per_expert(src, experts=4, hidden=256, inter=128)
    last = sorted(n for n in tensors if ".experts." in n)[-1]
    tensors[last][3, 5] = float("nan")
    save_file({k: v for k, v in tensors.items()}, str(src / "model.safetensors"))
    assert torch.isnan(load_file(str(src / "model.safetensors"))[last]).any()
    master, terminal = pty.openpty()
    proc = subprocess.Popen(cli_command("export", src, *EXPORT, "--out", tmp_path / "out"), env=cli_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal)
    os.close(terminal)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(timeout=240) == 2
    text = seen.decode()
    assert "export: " in text and "tensors" in text, text  # the progress line was drawn
    errors = [line for line in text.split("\n") if "megatron-qat export: error:" in line]
    assert len(errors) == 1 and errors[0].rstrip("\r").startswith("megatron-qat export: error: "), repr(text)
    assert last in errors[0] and "non-finite" in errors[0]
    assert sorted(os.listdir(tmp_path)) == ["src"]
