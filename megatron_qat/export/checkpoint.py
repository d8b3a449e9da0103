"""A BF16 Hugging Face safetensors checkpoint in, an MXFP4 one out (the offline export's files).

Source (:func:`open_source`): what :func:`megatron_qat.tools.safetensors_files.open_checkpoint`
reads (a directory, an index, one ``.safetensors`` file) with ``config.json`` next to it. Tensors
are read one at a time. Output: :class:`ShardWriter` buffers at most ``max_shard_bytes`` before
writing a shard into the output directory (:class:`megatron_qat.tools.atomic.AtomicDirectory`:
renamed into place only when complete), so memory stays bounded by one source tensor plus one
output shard.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..tools import safetensors_files
from ..tools.safetensors_files import SafetensorsCheckpoint, TensorInfo
from .codec import ExportError

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
_SKIP_COPY = (CONFIG_NAME, INDEX_NAME)
# other weight files (a pytorch_model.bin next to the safetensors) would ship stale BF16 weights
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
# tensors only a quantized checkpoint holds (MXFP4 gpt-oss / compressed-tensors, FP8, GPTQ, ...)
QUANTIZED_SUFFIXES = ("_blocks", "_scales", ".weight_packed", ".weight_scale", ".weight_scale_inv", ".weight_global_scale", ".qweight", ".scales")


@dataclass
class Source:
    """A safetensors checkpoint and its ``config.json``."""

    checkpoint: SafetensorsCheckpoint
    config: dict
    path: str  # as given

    @property
    def root(self) -> str:
        return self.checkpoint.root

    @property
    def files(self) -> list[str]:
        return [f.path for f in self.checkpoint.files]

    def infos(self) -> list[TensorInfo]:
        return self.checkpoint.infos()

    def tensors(self) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
        """``(info, tensor)`` one at a time (each read when reached)."""
        for info in self.checkpoint.infos():
            yield info, self.checkpoint.read(info)

    def quantized(self) -> str | None:
        """Why this checkpoint is already quantized (``None``: it is not): a ``quantization_config``
        in its config, or a tensor only quantized checkpoints hold."""
        qc = self.config.get("quantization_config")
        if qc:
            method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
            return f"{self.root}/{CONFIG_NAME} has a quantization_config (quant_method {method!r})"
        for info in self.infos():
            if info.name.endswith(QUANTIZED_SUFFIXES):
                return f"it holds quantized tensors (e.g. {info.name})"
        return None


def open_source(src: str) -> Source:
    """The checkpoint at ``src`` with its ``config.json`` (CheckpointError / ExportError, one line)."""
    checkpoint = safetensors_files.open_checkpoint(src)
    config_path = os.path.join(checkpoint.root, CONFIG_NAME)
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{config_path}: cannot read the model config ({type(exc).__name__}); the export needs config.json") from None
    if not isinstance(config, dict):
        raise ExportError(f"{config_path}: expected a JSON object")
    return Source(checkpoint, config, src)


@dataclass
class ShardWriter:
    """Buffer output tensors, write ``model-XXXXX.safetensors`` shards into the directory ``tmp``."""

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
        if not self._pending:
            return
        fname = f"part-{len(self._shards):05d}.safetensors"
        safetensors_files.save(os.path.join(self.tmp, fname), self._pending, metadata={"format": "pt"})
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


def copy_side_files(src_root: str, dst: str, checkpoint_files: list[str]) -> None:
    """Copy tokenizer, generation config, ... (every regular file but config.json and weight files:
    safetensors, indexes, ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt`` / ``.h5`` / ``.msgpack`` / ``.gguf``).
    The copies are new files (the umask decides their mode, as for every output file)."""
    skip = {os.path.abspath(p) for p in checkpoint_files}
    for name in sorted(os.listdir(src_root)):
        path = os.path.join(src_root, name)
        if not os.path.isfile(path) or name in _SKIP_COPY or os.path.abspath(path) in skip or name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copyfile(path, os.path.join(dst, name))
