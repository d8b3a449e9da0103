"""Read a BF16 Hugging Face safetensors checkpoint, write one atomically.

Source: a directory (``model.safetensors.index.json`` or ``*.safetensors`` files, plus
``config.json``), an index file, or one ``.safetensors`` file (``config.json`` next to it).
Tensors are read one at a time (``safetensors.safe_open``); the writer buffers at most
``max_shard_bytes`` of output before writing a shard, so memory stays bounded by one source tensor
plus one output shard. Everything is written into a temporary sibling directory that is renamed
to the destination only when complete (nothing half-written on error).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .codec import ExportError

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
_SKIP_COPY = (CONFIG_NAME, INDEX_NAME)
# other weight files (a pytorch_model.bin next to the safetensors) would ship stale BF16 weights
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")


@dataclass
class Source:
    root: str  # directory holding config.json and the other files
    files: list[str]  # safetensors files, in order
    config: dict

    def entries(self) -> Iterator[tuple[str, str, tuple[int, ...], str]]:
        """``(file, name, shape, dtype string)`` of every tensor, without reading data."""
        from safetensors import safe_open

        for path in self.files:
            with safe_open(path, "pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    yield path, name, tuple(sl.get_shape()), sl.get_dtype()

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` one at a time (each read when reached)."""
        from safetensors import safe_open

        for path in self.files:
            with safe_open(path, "pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)


def open_source(src: str) -> Source:
    """ExportError (one line) for a path that is not a safetensors checkpoint with a config.json."""
    if os.path.isdir(src):
        root = src
        index = os.path.join(src, INDEX_NAME)
        if os.path.exists(index):
            files = _index_files(index)
        else:
            files = sorted(os.path.join(src, n) for n in os.listdir(src) if n.endswith(".safetensors"))
    elif src.endswith(".index.json") and os.path.isfile(src):
        root, files = os.path.dirname(os.path.abspath(src)), _index_files(src)
    elif src.endswith(".safetensors") and os.path.isfile(src):
        root, files = os.path.dirname(os.path.abspath(src)), [src]
    else:
        raise ExportError(f"{src}: not a safetensors checkpoint (accepted: a directory, a *.safetensors.index.json or a *.safetensors file)")
    if not files:
        raise ExportError(f"{src}: no *.safetensors files found")
    config_path = os.path.join(root, CONFIG_NAME)
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{config_path}: cannot read the model config ({type(exc).__name__}); the export needs config.json") from None
    if not isinstance(config, dict):
        raise ExportError(f"{config_path}: expected a JSON object")
    return Source(root, files, config)


def _index_files(index: str) -> list[str]:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{index}: not a safetensors index with a weight_map ({type(exc).__name__})") from None
    root = os.path.dirname(os.path.abspath(index))
    files = []
    for shard in weight_map.values():
        path = os.path.join(root, shard)
        if path not in files:
            files.append(path)
    missing = [p for p in files if not os.path.isfile(p)]
    if missing:
        raise ExportError(f"{index}: lists {os.path.basename(missing[0])}, which does not exist")
    return files


class Progress:
    """One self-overwriting stderr line: tensors done / total and bytes read (no dependency)."""

    def __init__(self, total: int, total_bytes: int, enabled: bool = True):
        self.total, self.total_bytes, self.enabled = total, total_bytes, enabled
        self.done = self.bytes = 0
        self._last = 0.0

    def step(self, nbytes: int) -> None:
        self.done += 1
        self.bytes += nbytes
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.5 or self.done == self.total):
            self._last = now
            pct = 100.0 * self.bytes / max(self.total_bytes, 1)
            sys.stderr.write(f"\rexport: {self.done}/{self.total} tensors, {self.bytes / 2**30:.2f}/{self.total_bytes / 2**30:.2f} GiB ({pct:.0f}%)")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


@dataclass
class ShardWriter:
    """Buffer output tensors, write ``model-XXXXX.safetensors`` shards into ``tmp`` dir."""

    tmp: str
    max_shard_bytes: int
    _pending: dict = field(default_factory=dict)
    _pending_bytes: int = 0
    _shards: list = field(default_factory=list)  # (file name, [tensor names])
    _names: set = field(default_factory=set)  # every name added (O(1) duplicate check: ~10^5 names for DeepSeek-V3)
    total_bytes: int = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self._names:
            raise ExportError(f"{name}: written twice (two source tensors map to one output name)")
        self._names.add(name)
        nbytes = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self._pending[name] = t.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        fname = f"part-{len(self._shards):05d}.safetensors"
        save_file(self._pending, os.path.join(self.tmp, fname), metadata={"format": "pt"})
        self._shards.append((fname, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> dict:
        """Rename shards to ``model-0000i-of-0000n.safetensors``; return the index's weight_map."""
        self.flush()
        n = len(self._shards)
        weight_map = {}
        for i, (fname, names) in enumerate(self._shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(os.path.join(self.tmp, fname), os.path.join(self.tmp, final))
            weight_map.update({name: final for name in names})
        return weight_map


class AtomicDir:
    """``with AtomicDir(dst) as tmp:`` write into ``tmp``; renamed to ``dst`` on success, removed on error."""

    def __init__(self, dst: str):
        self.dst = os.path.abspath(dst)
        if os.path.exists(self.dst):
            raise ExportError(f"{dst}: already exists; choose a new --out directory")
        parent = os.path.dirname(self.dst)
        if not os.path.isdir(parent):
            raise ExportError(f"{dst}: parent directory {parent} does not exist")
        self.tmp = None

    def __enter__(self) -> str:
        self.tmp = tempfile.mkdtemp(prefix=os.path.basename(self.dst) + ".partial-", dir=os.path.dirname(self.dst))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.rename(self.tmp, self.dst)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def copy_side_files(src_root: str, dst: str, checkpoint_files: list[str]) -> None:
    """Copy tokenizer, generation config, ... (every regular file but config.json and weight files:
    safetensors, indexes, ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt`` / ``.h5`` / ``.msgpack`` / ``.gguf``)."""
    skip = {os.path.abspath(p) for p in checkpoint_files}
    for name in sorted(os.listdir(src_root)):
        path = os.path.join(src_root, name)
        if not os.path.isfile(path) or name in _SKIP_COPY or os.path.abspath(path) in skip or name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copy2(path, os.path.join(dst, name))


def write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
