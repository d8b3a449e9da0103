"""A throw-away ``megatron`` package tree on disk, for tests that need fresh interpreters to import
a Megatron-shaped module chain (autoload, fail-closed, INFO lines) without the real package.

:func:`write_mini_megatron` writes the package ``__init__`` files, an extension module whose
``TEGroupedLinear`` is the TE stand-in of tests/te_standin.py, and the ``moe_layer`` module source
the test gives; ``extra`` adds or replaces files (path relative to the tree -> source).
"""

from __future__ import annotations

from pathlib import Path

STANDIN_EXTENSION = "from te_standin import StandInGroupedLinear\nclass TEGroupedLinear(StandInGroupedLinear):\n    pass\n"


def write_mini_megatron(root: Path, moe_layer: str, extra: dict[str, str] | None = None) -> Path:
    files = {
        "megatron/__init__.py": "",
        "megatron/core/__init__.py": "",
        "megatron/core/extensions/__init__.py": "",
        "megatron/core/extensions/transformer_engine.py": STANDIN_EXTENSION,
        "megatron/core/transformer/__init__.py": "",
        "megatron/core/transformer/moe/__init__.py": "",
        "megatron/core/transformer/moe/moe_layer.py": moe_layer,
        **(extra or {}),
    }
    for rel, text in files.items():
        path = Path(root) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return Path(root)
