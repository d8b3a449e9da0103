"""The one safetensors reader (and shard writer) of the command-line tools.

A checkpoint path is a ``.safetensors`` file, a ``*.safetensors.index.json``, or a directory
holding exactly one such index (then the shards its ``weight_map`` names) or else ``*.safetensors``
files (all of them, sorted). :func:`open_checkpoint` reads only the headers: each tensor is a
:class:`TensorInfo` (name, file, shape, safetensors dtype name); data is read when asked, a whole
tensor or a slice (``safe_open(...).get_slice(name)[index]``, so a 20 GB shard is never loaded).

Every failure is a :class:`~megatron_qat.tools.errors.CheckpointError` naming the file: a path
that does not exist, a file of another type, a truncated / corrupt file (safetensors checks that
the header is valid JSON and that its offsets cover the file exactly), an index that is not a JSON
``weight_map`` or names a missing shard or a tensor its shard lacks.

:data:`DTYPES` is the one table of safetensors dtype names; :data:`QUANTIZABLE` the names of the
dtypes MXFP4 quantizes (:data:`megatron_qat.numerics.format.SUPPORTED_DTYPES`).
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass

import torch

from ..numerics.format import SUPPORTED_DTYPES
from .errors import CheckpointError

INDEX_SUFFIX = ".safetensors.index.json"
FILE_SUFFIX = ".safetensors"
ACCEPTED = f"a *{FILE_SUFFIX} file, a *{INDEX_SUFFIX}, or a directory holding them"

# safetensors dtype name -> torch dtype (those this torch has)
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in (
        ("BOOL", "bool"), ("U8", "uint8"), ("I8", "int8"), ("U16", "uint16"), ("I16", "int16"), ("U32", "uint32"),
        ("I32", "int32"), ("U64", "uint64"), ("I64", "int64"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("F32", "float32"), ("F64", "float64"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
        ("F8_E8M0", "float8_e8m0fnu"),
    )
    if hasattr(torch, attr)
}
QUANTIZABLE = tuple(name for name, dtype in DTYPES.items() if dtype in SUPPORTED_DTYPES)
_BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}  # sub-byte types torch has no dtype for


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as its file's header describes it (no data read)."""

    name: str
    file: str
    shape: tuple[int, ...]
    dtype_name: str  # safetensors' name: "BF16", "F8_E4M3", ...

    @property
    def dtype(self) -> torch.dtype | None:
        return DTYPES.get(self.dtype_name)

    @property
    def quantizable(self) -> bool:
        return self.dtype_name in QUANTIZABLE

    @property
    def floating(self) -> bool:
        return self.dtype_name.startswith(("F", "BF"))

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        dtype = self.dtype
        bits = dtype.itemsize * 8 if dtype is not None else _BITS.get(self.dtype_name, 8)
        return (self.numel * bits + 7) // 8


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.replace("Error while deserializing header: ", "")


class SafetensorsFile:
    """One ``.safetensors`` file, its header parsed on opening (CheckpointError if it is not a valid one)."""

    def __init__(self, path: str):
        import safetensors  # looked up when called (tests watch safe_open)

        self.path = path
        try:
            self._handle = safetensors.safe_open(path, framework="pt", device="cpu")
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot open ({exc.strerror or type(exc).__name__})") from None
        except Exception as exc:  # SafetensorError: bad header, truncated, not a safetensors file at all
            raise CheckpointError(f"{path}: not a valid safetensors file, truncated or corrupt (header: {_reason(exc)})") from None

    def names(self) -> list[str]:
        return list(self._handle.keys())

    def infos(self, names: list[str] | None = None) -> list[TensorInfo]:
        """Every tensor's info (``names``: only these, in this order)."""
        out = []
        for name in self.names() if names is None else names:
            sl = self._handle.get_slice(name)
            out.append(TensorInfo(name, self.path, tuple(int(d) for d in sl.get_shape()), sl.get_dtype()))
        return out

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` (CPU)."""
        try:
            return self._handle.get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"{self.path}: cannot read tensor {name} ({_reason(exc)})") from None

    def read_slice(self, name: str, index: tuple) -> torch.Tensor:
        """``tensor[index]`` of ``name``, reading only those elements (``index``: ints and slices)."""
        try:
            return self._handle.get_slice(name)[index]
        except Exception as exc:
            raise CheckpointError(f"{self.path}: reading {name}[{_index_text(index)}] failed ({_reason(exc)})") from None


def _index_text(index: tuple) -> str:
    return ", ".join(f"{i.start or ''}:{'' if i.stop is None else i.stop}" if isinstance(i, slice) else str(i) for i in index)


def read_index(path: str) -> dict[str, str]:
    """``{tensor name: shard path}`` of a ``*.safetensors.index.json`` (shards next to it, each present)."""
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError("weight_map must map tensor names to shard file names")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a safetensors index (need a JSON object with a weight_map: {_reason(exc)})") from None
    base = os.path.dirname(os.path.abspath(path))
    out = {name: os.path.join(base, shard) for name, shard in weight_map.items()}
    for shard in dict.fromkeys(out.values()):
        if not os.path.isfile(shard):
            raise CheckpointError(f"{path}: shard {os.path.basename(shard)!r} listed in weight_map not found in {base}")
    return out


def find(directory: str) -> tuple[str | None, list[str]]:
    """``(index, [])`` for a directory holding exactly one ``*.safetensors.index.json``, else
    ``(None, sorted *.safetensors)`` (``(None, [])``: none). Several indexes: CheckpointError."""
    indexes = sorted(glob.glob(os.path.join(glob.escape(directory), "*" + INDEX_SUFFIX)))
    if len(indexes) > 1:
        raise CheckpointError(f"{directory}: several safetensors indexes ({', '.join(map(os.path.basename, indexes))}); pass one of them")
    if indexes:
        return indexes[0], []
    return None, sorted(glob.glob(os.path.join(glob.escape(directory), "*" + FILE_SUFFIX)))


@dataclass
class SafetensorsCheckpoint:
    """The tensors of one checkpoint path, headers read."""

    root: str  # the directory config.json and side files live in
    index: str | None
    files: list[SafetensorsFile]
    _infos: list[TensorInfo]

    def infos(self) -> list[TensorInfo]:
        """Every tensor, shard by shard (shards sorted by name), in each shard's own order."""
        return list(self._infos)

    def file(self, info: TensorInfo) -> SafetensorsFile:
        return self._by_path[info.file]

    def read(self, info: TensorInfo) -> torch.Tensor:
        return self.file(info).read(info.name)

    def __post_init__(self):
        self._by_path = {f.path: f for f in self.files}


def open_checkpoint(path: str) -> SafetensorsCheckpoint:
    """Open the safetensors checkpoint at ``path`` (see the module docstring); CheckpointError otherwise."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        index, shards = find(path)
        root = path
        if index is None and not shards:
            raise CheckpointError(f"{path}: no *{FILE_SUFFIX} files and no *{INDEX_SUFFIX} in this directory")
    elif path.endswith(INDEX_SUFFIX):
        index, shards, root = path, [], os.path.dirname(os.path.abspath(path))
    elif path.endswith(FILE_SUFFIX):
        index, shards, root = None, [path], os.path.dirname(os.path.abspath(path))
    else:
        raise CheckpointError(f"{path}: not a safetensors checkpoint (accepted: {ACCEPTED})")
    if index is None:
        files = [SafetensorsFile(p) for p in shards]
        infos = [info for f in files for info in f.infos()]
        return SafetensorsCheckpoint(root, None, files, infos)
    by_shard: dict[str, list[str]] = {}
    for name, shard in read_index(index).items():
        by_shard.setdefault(shard, []).append(name)
    files, infos = [], []
    for shard in sorted(by_shard):
        names = by_shard[shard]
        f = SafetensorsFile(shard)
        present = set(f.names())
        missing = [n for n in names if n not in present]
        if missing:
            raise CheckpointError(f"{index}: lists {len(missing)} tensor(s) absent from {os.path.basename(shard)}, e.g. {missing[0]!r}")
        files.append(f)
        order = {n: i for i, n in enumerate(f.names())}
        infos.extend(f.infos(sorted(names, key=order.__getitem__)))
    return SafetensorsCheckpoint(root, index, files, infos)


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def save(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, the file then given the usual mode ``0o666 & ~umask``
    (safetensors 0.8 creates it 0600: unreadable by a serving process of another user). A failed
    write (disk full, file size limit) raises OSError with its errno and ``path`` (safetensors
    reports it as a SafetensorError whose text holds the OS error)."""
    from safetensors.torch import save_file

    from .atomic import umask

    try:
        save_file(tensors, path, metadata=metadata)
        os.chmod(path, 0o666 & ~umask())
    except OSError:
        raise
    except Exception as exc:
        found = _OS_ERROR.search(str(exc))
        if found is None:
            raise CheckpointError(f"{path}: cannot write ({_reason(exc)})") from None
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), path) from None
