"""Structure of megatron_qat/megatron (issue 14, item 1), checked on the source (every ``import`` and
every module-level assignment, via the AST):

- the modules the autoload ``.pth`` loads at interpreter start (``install``, ``failclosed``, the
  package ``__init__``) import no torch at module level, and ``install`` reaches the runtime only
  lazily (``runtime`` imports ``install`` for its post-import watcher, never the other way at import);
- no module-level mutable state beyond the one process handle ``install._runtime``: every other
  module-level name is a constant, a function, a class or an immutable alias.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_qat" / "megatron"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))


def _tree(module: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{module}.py").read_text())


def _imports(module: str, top_level_only: bool = False) -> set[str]:
    tree = _tree(module)
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            found.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_four_modules_each_named_for_its_job():
    assert MODULES == ["__init__", "cache", "failclosed", "install", "runtime"]


@pytest.mark.parametrize("module", ["__init__", "install", "failclosed"])
def test_interpreter_start_modules_import_no_torch_at_module_level(module):
    assert not {name for name in _imports(module, top_level_only=True) if name.split(".")[0] == "torch"}


def test_install_reaches_the_runtime_only_lazily():
    assert ".runtime" not in _imports("install", top_level_only=True)
    assert ".runtime" in _imports("install")


def _is_immutable_value(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.Tuple):
        return all(_is_immutable_value(e) for e in node.elts)
    if isinstance(node, ast.BinOp):  # string concatenation of constants
        return _is_immutable_value(node.left) and _is_immutable_value(node.right)
    if isinstance(node, ast.Name):  # another module-level constant
        return node.id.isupper()
    return False


# module-level names that are not constants but hold no state: (module, name) -> why
ALLOWED = {
    ("runtime", "_MISSING"): "a sentinel object",
    ("runtime", "_log"): "the logging.Logger (the logging module owns it)",
    ("runtime", "_QUANTIZED_TYPE_NAMES"): "a set literal never mutated (class names)",
    ("runtime", "_GROUPED_TYPE_NAMES"): "a set literal never mutated (class names)",
    ("cache", "_version_of"): "operator.attrgetter",
    ("cache", "_requires_grad_of"): "operator.attrgetter",
    ("cache", "_data_ptr"): "torch.Tensor.data_ptr",
    ("cache", "_capturing"): "torch's capture query (a C function)",
    ("install", "_runtime"): "THE one process handle",
}


@pytest.mark.parametrize("module", MODULES)
def test_no_module_level_mutable_state_beyond_the_one_handle(module):
    """Old code: module-level mutable state in 8 places (patch.py, weight_cache.py, failclosed.py,
    announce.py, import_watch.py, guards.py, config.py, metrics/__init__.py)."""
    found = []
    for node in _tree(module).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            if not isinstance(target, ast.Name) or target.id == "__all__":
                continue
            value = node.value
            if (module, target.id) in ALLOWED or (value is not None and _is_immutable_value(value)):
                continue
            found.append(f"{module}.{target.id}")
    assert not found, f"module-level state: {found}"
