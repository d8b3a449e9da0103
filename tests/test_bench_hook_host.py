"""benchmarks/bench_hook_host.py runs end to end on CPU (a tiny sample; no timing is asserted):
every timed call of the patched hook is a cache hit, and the report is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_hook_host.py"


def test_runs_and_writes_the_report(tmp_path):
    out = tmp_path / "hook.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--calls", "20", "--repeats", "2", "--experts", "4",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert "| hook, grad |" in text and "| forward wrapper |" in text and "cache hit" in text
