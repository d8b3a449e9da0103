"""Helpers shared by the test files (one copy each; flashinfer's tests keep theirs in one module too).

- :func:`require`: the one rule for optional test dependencies: skip locally with a reason, FAIL
  under ``CI=true`` (``.ci/run`` installs every test dependency, so a missing one is a broken CI).
- :func:`bits`: the integer view of a float tensor, for bit-exact asserts (``torch.equal`` on it
  tells -0.0 from +0.0 and compares NaN payloads).
- :func:`one_line_error`: the CLI contract for a refused input: exactly one stderr line, starting
  with ``megatron-qat COMMAND: error:``, no traceback.
- :func:`imports`: the imports of a source file (AST, so a lazy import inside a function counts).
- :func:`run_cli`: ``megatron-qat ...`` in a real subprocess (exit codes, signals, environment).
"""

from __future__ import annotations

import ast
import importlib
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PKG = REPO / "megatron_qat"


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def require(module: str, reason: str | None = None, minversion: str | None = None):
    """Import ``module`` (at least ``minversion``). Missing or too old: ``pytest.skip`` with
    ``reason`` locally, a test FAILURE under ``CI=true``."""
    why = reason or f"{module} is a test dependency"
    try:
        mod = importlib.import_module(module)
        if minversion is not None:
            from packaging.version import Version

            have = getattr(mod, "__version__", "0")
            if Version(have) < Version(minversion):
                raise ImportError(f"{module} {have} < {minversion}")
    except ImportError as exc:
        if in_ci():
            pytest.fail(f"CI=true: {why}, but {exc}", pytrace=False)
        pytest.skip(f"{why} ({exc})", allow_module_level=True)
    return mod


def require_that(condition: bool, reason: str) -> None:
    """Like :func:`require` for a capability that is not a module (skip locally, fail under CI)."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def bits(t):
    """``t`` as integers of its width (bf16/fp16 -> int16, fp32 -> int32), contiguous, detached."""
    from megatron_qat.numerics.format import INT_VIEW_DTYPES

    t = t.detach().contiguous()
    return t.view(INT_VIEW_DTYPES[t.dtype]) if t.dtype in INT_VIEW_DTYPES else t


def one_line_error(stderr: str, command: str, *needles: str) -> str:
    """Assert ``stderr`` is one line ``megatron-qat COMMAND: error: ...`` holding every needle."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    prefix = f"megatron-qat {command}: error: "
    assert len(lines) == 1 and lines[0].startswith(prefix), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def imports(path: pathlib.Path, top_level_only: bool = False):
    """``(top-level megatron_qat package or None, imported names, module)`` of every import in ``path``
    (a file of the package; ``top_level_only``: only the module body's own statements, not those
    inside functions or classes).

    ``module`` is the absolute dotted name; the first item is the ``megatron_qat`` sub-package it
    names (``None`` for an import outside ``megatron_qat``)."""
    pkg_parts = path.resolve().relative_to(PKG.parent).with_suffix("").parts[:-1]
    tree = ast.parse(path.read_text())
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg_parts[: len(pkg_parts) - node.level + 1])
                module = base + (node.module.split(".") if node.module else [])
            else:
                module = (node.module or "").split(".")
            names = [a.name for a in node.names]
            if module[:1] == ["megatron_qat"] and len(module) == 1:  # from megatron_qat import x / from .. import x
                for n in names:
                    yield n, [], f"megatron_qat.{n}"
            else:
                yield (module[1] if module[:1] == ["megatron_qat"] else None), names, ".".join(module)
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                yield (parts[1] if parts[0] == "megatron_qat" and len(parts) > 1 else None), [], a.name


def cli_env(**update: str) -> dict:
    """``os.environ`` without any megatron-qat variable, plus ``update``; the repo on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEGATRON_QAT_", "OPEN_TRAINING_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(update)
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_qat.cli", *map(str, args)]


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``megatron-qat ARGS`` in a real subprocess (text output captured)."""
    return subprocess.run(cli_command(*args), env=cli_env() if env is None else env, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def spawn_ranks(worker, world: int, outdir: str) -> list:
    """Run ``worker(rank, port, outdir)`` in ``world`` real processes (``torch.multiprocessing.spawn``,
    a free TCP port on 127.0.0.1 for ``init_process_group``); each rank ``torch.save``s its results
    to ``outdir/rank{rank}.pt``. Returns them, rank by rank."""
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, outdir), nprocs=world, join=True)
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
