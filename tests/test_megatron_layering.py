"""Imports inside megatron_qat/megatron point one way (issue 9, item 3): ``autoload`` -> ``patch``,
never back; ``import_watch`` (the post-import finder both use) imports nothing of ours; and the
modules the autoload ``.pth`` loads at interpreter start import no torch at module level.
Checked on the source (every ``import`` statement, at any depth)."""

from __future__ import annotations

from pathlib import Path

import pytest

from _helpers import imports

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_qat" / "megatron"


def _imports(module: str, top_level_only: bool = False) -> set[str]:
    """Absolute names of what ``megatron_qat/megatron/MODULE.py`` imports (``from p import n``: ``p.n`` too)."""
    found = set()
    for _, names, base in imports(PACKAGE / f"{module}.py", top_level_only):
        found.add(base)
        found.update(f"{base}.{n}" for n in names)
    return found


@pytest.mark.parametrize("module", sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("autoload", "__init__")))
def test_nothing_imports_autoload(module):
    """Old code: patch.py imported autoload (and autoload imported patch)."""
    autoload = "megatron_qat.megatron.autoload"
    assert not {name for name in _imports(module) if name == autoload or name.startswith(autoload + ".")}


def test_import_watch_is_self_contained():
    assert {name.split(".")[0] for name in _imports("import_watch")} <= {"__future__", "sys", "typing"}


@pytest.mark.parametrize("module", ["autoload", "import_watch", "patch", "failclosed", "versions", "hook", "announce"])
def test_interpreter_start_modules_import_no_torch_at_module_level(module):
    assert not {name for name in _imports(module, top_level_only=True) if name.split(".")[0] == "torch"}
