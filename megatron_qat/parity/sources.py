"""Where the tensors come from: safetensors (file, directory, ``*.safetensors.index.json``),
torch ``.pt`` / ``.pth`` / ``.bin`` state dicts, or the built-in synthetic families.

Lazy by design: a :class:`TensorEntry` knows a tensor's name, shape and dtype (read from the
header) and reads a range of its rows on demand. safetensors tensors are read through
``safe_open(...).get_slice(name)[...]``, so only the requested rows of one tensor are ever in
memory. ``.pt`` files are opened with ``torch.load(map_location="cpu", weights_only=True,
mmap=True)`` (legacy non-zip files fall back to ``mmap=False``, noted in the report).
safetensors files are read by the tools' one reader (:mod:`megatron_qat.tools.safetensors_files`,
shared with ``megatron-qat export``): a corrupt or truncated file is a one-line error naming it.

Rows: MXFP4 blocks run along ``in_features``, which is not always the last stored dimension
(gpt-oss stores ``[E, in, out]``). An entry has ``in_dim`` (set from :mod:`megatron_qat.layouts`
by the runner; the last dimension until then) and is read as its *blocked view*: the stored
tensor with ``in_dim`` moved last, ``R = prod(blocked_shape[:-1])`` rows of ``K = shape[in_dim]``
(a 1-D tensor is one row). ``read_rows`` ranges never cross the blocked view's last-but-one
dimension (one matrix); for an ``[E, in, out]`` tensor a range of rows is a slice of columns of
one expert, read with ``get_slice`` and transposed.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..numerics.format import SUPPORTED_DTYPES
from ..tools import safetensors_files
from .errors import ParityError


@dataclass
class TensorEntry:
    """One tensor of a source. ``read_rows(start, stop)`` -> CPU tensor ``[stop - start, K]`` of rows
    of the blocked view (``in_dim`` last). ``read_stored(index)`` indexes the stored tensor."""

    name: str
    file: str | None
    shape: tuple[int, ...]  # as stored
    dtype_name: str  # as stored ("BF16", "bfloat16", ...)
    dtype: torch.dtype | None  # None unless it is one MXFP4 quantizes (numerics.format.SUPPORTED_DTYPES)
    dtype_skip: str | None
    read_stored: Callable[[tuple], torch.Tensor]
    in_dim: int | None = None  # the in_features dim of the stored shape; None: the last one
    layout: dict | None = None  # what decided in_dim (family, role, ...), for the report

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def k_dim(self) -> int:
        return len(self.shape) - 1 if self.in_dim is None else self.in_dim

    @property
    def blocked_dims(self) -> tuple[int, ...]:
        """Stored dim of each blocked-view dim: the others in order, then ``in_dim``."""
        k = self.k_dim
        return tuple(d for d in range(len(self.shape)) if d != k) + ((k,) if self.shape else ())

    @property
    def blocked_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[d] for d in self.blocked_dims)

    @property
    def k(self) -> int:
        return self.blocked_shape[-1] if self.shape else 0

    def skip_reason(self, block_size: int) -> str | None:
        """Why this tensor cannot be compared in blocks of ``block_size`` (``None``: it can)."""
        return self.dtype_skip or _shape_skip(self.blocked_shape, block_size)

    @property
    def rows(self) -> int:
        b = self.blocked_shape
        return math.prod(b[:-1]) if len(b) > 1 else (1 if b else 0)

    @property
    def matrix_rows(self) -> int:
        """Rows per innermost matrix of the blocked view; ranges never cross a multiple of it."""
        b = self.blocked_shape
        return b[-2] if len(b) > 1 else 1

    def stored_index(self, blocked_index: list[int]) -> list[int]:
        """An index into the blocked view -> the same element's index into the stored tensor."""
        out = [0] * len(self.shape)
        for j, d in enumerate(self.blocked_dims):
            out[d] = int(blocked_index[j])
        return out

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        bidx = _row_index(self.blocked_shape, start, stop)
        sidx = [slice(None)] * len(self.shape)  # the in_features dim stays whole
        for d, i in zip(self.blocked_dims, bidx):
            sidx[d] = i
        t = self.read_stored(tuple(sidx))
        if len(self.shape) > 1 and self.k_dim < self.blocked_dims[-2]:
            t = t.transpose(0, 1)  # stored [.., in, .., out]: the slice came back [K, rows]
        return t.reshape(-1, self.k)


def _dtype_skip(dtype_name: str, floating: bool) -> str | None:
    if not floating:
        return f"skipped: non-floating dtype {dtype_name}"
    return f"skipped: dtype {dtype_name} not supported (accepted: bfloat16, float16, float32)"


def _shape_skip(shape: tuple[int, ...], block: int) -> str | None:
    if len(shape) == 0:
        return "skipped: 0-d tensor (need [..., K])"
    if math.prod(shape) == 0:
        return f"skipped: empty tensor {list(shape)}"
    if shape[-1] % block:
        return f"skipped: K={shape[-1]} not a multiple of {block}"
    return None


def _row_index(shape: tuple[int, ...], start: int, stop: int) -> tuple:
    """Index selecting flat rows [start, stop) of one matrix of a tensor of ``shape``."""
    if len(shape) == 1:
        return (slice(None),)
    n = shape[-2]
    lead = start // n
    if (stop - 1) // n != lead:
        raise ValueError(f"row range [{start}, {stop}) crosses a matrix boundary (rows per matrix {n})")
    outer = []
    for dim in reversed(shape[:-2]):
        outer.append(lead % dim)
        lead //= dim
    return (*reversed(outer), slice(start % n, stop - (start - start % n)))


# --------------------------------------------------------------------------- safetensors
def safetensors_entries(path: str) -> list[TensorEntry]:
    """Entries of a safetensors checkpoint path (a file or an index; CheckpointError names a bad file)."""
    checkpoint = safetensors_files.open_checkpoint(path)
    entries = []
    for info in checkpoint.infos():
        handle = checkpoint.file(info)
        skip = None if info.quantizable else _dtype_skip(info.dtype_name, info.floating)
        dtype = info.dtype if info.quantizable else None

        def read(index: tuple, _name=info.name, _handle=handle) -> torch.Tensor:
            return _handle.read_slice(_name, index)

        entries.append(TensorEntry(info.name, info.file, info.shape, info.dtype_name, dtype, skip, read))
    return entries


# --------------------------------------------------------------------------- torch .pt
def _flatten(obj, prefix: str, out: dict, other: list) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out, other)
    elif isinstance(obj, (list, tuple)) and obj and all(isinstance(v, (dict, torch.Tensor)) for v in obj):
        for i, value in enumerate(obj):
            _flatten(value, f"{prefix}.{i}" if prefix else str(i), out, other)
    else:
        other.append(prefix)


def load_torch(path: str, trust_pickle: bool, notes: list[str]) -> dict[str, torch.Tensor]:
    """Flattened ``{dotted name: tensor}`` of a torch checkpoint (``{"model": {...}}`` etc.)."""
    import pickle

    kwargs = dict(map_location="cpu", weights_only=not trust_pickle)
    try:
        obj = torch.load(path, mmap=True, **kwargs)
    except RuntimeError as exc:
        if "mmap" not in str(exc) and "zip" not in str(exc):
            raise ParityError(f"{path}: torch.load failed: {exc}") from exc
        notes.append(f"{path}: not a zip-format checkpoint, loaded without mmap (whole file in memory)")
        try:
            obj = torch.load(path, **kwargs)
        except Exception as exc2:
            raise ParityError(f"{path}: torch.load failed: {exc2}") from exc2
    except pickle.UnpicklingError as exc:
        raise ParityError(
            f"{path}: refused by torch.load(weights_only=True) ({str(exc).splitlines()[0]}). If you trust "
            "this file (e.g. a Megatron model_optim_rng.pt with its args), rerun with --trust-pickle."
        ) from exc
    except Exception as exc:
        raise ParityError(f"{path}: torch.load failed ({type(exc).__name__}: {exc})") from exc
    tensors: dict[str, torch.Tensor] = {}
    other: list[str] = []
    _flatten(obj, "", tensors, other)
    if other:
        notes.append(f"{path}: {len(other)} non-tensor entr{'y' if len(other) == 1 else 'ies'} ignored (e.g. {other[0]!r})")
    return tensors


def _tensor_entry(name: str, file: str | None, t: torch.Tensor) -> TensorEntry:
    shape = tuple(t.shape)
    if t.dtype in SUPPORTED_DTYPES:
        skip, dtype = None, t.dtype
    else:
        skip, dtype = _dtype_skip(str(t.dtype).replace("torch.", ""), t.dtype.is_floating_point), None
    return TensorEntry(name, file, shape, str(t.dtype).replace("torch.", ""), dtype, skip, t.__getitem__)


def torch_entries(path: str, trust_pickle: bool, notes: list[str]) -> list[TensorEntry]:
    return [_tensor_entry(n, path, t) for n, t in load_torch(path, trust_pickle, notes).items()]


def synthetic_entries(seed: int = 0) -> list[TensorEntry]:
    from ..numerics.families import synthetic_tensors

    return [_tensor_entry(name, None, t) for name, t in synthetic_tensors(seed)]


# --------------------------------------------------------------------------- path resolution
_TORCH_EXT = (".pt", ".pth", ".bin")


def _directory_files(path: str) -> list[tuple[str, str]]:
    """(kind, file) for a checkpoint directory: index > safetensors > torch files > Megatron layout."""
    index, shards = safetensors_files.find(path)
    if index is not None:
        return [("safetensors", index)]
    if shards:
        return [("safetensors", s) for s in shards]
    torch_files = sorted(f for ext in _TORCH_EXT for f in glob.glob(os.path.join(path, "*" + ext)))
    if torch_files:
        return [("torch", f) for f in torch_files]
    if glob.glob(os.path.join(path, "*.distcp")) or os.path.exists(os.path.join(path, ".metadata")):
        raise ParityError(
            f"{path}: a Megatron distributed (torch_dist) checkpoint; parity reads safetensors or torch "
            "state dicts: convert it first (e.g. Megatron-LM tools/checkpoint or an HF export)"
        )
    tracker = os.path.join(path, "latest_checkpointed_iteration.txt")
    if os.path.isfile(tracker):
        with open(tracker, encoding="utf-8") as f:
            it = f.read().strip()
        sub = "release" if it == "release" else f"iter_{int(it):07d}"
        return _directory_files(os.path.join(path, sub))
    rank_files = sorted(glob.glob(os.path.join(path, "mp_rank_*", "*.pt")))
    if rank_files:
        return [("torch", f) for f in rank_files]
    raise ParityError(
        f"{path}: no checkpoint found (looked for *.safetensors.index.json, *.safetensors, *.pt/*.pth/*.bin, "
        "Megatron latest_checkpointed_iteration.txt or mp_rank_*/*.pt)"
    )


def resolve(paths: list[str]) -> list[tuple[str, str]]:
    """Expand user paths into (kind, file) pairs; ParityError (exit 2) names a bad path."""
    out: list[tuple[str, str]] = []
    for p in paths:
        if not os.path.exists(p):
            raise ParityError(f"{p}: no such file or directory")
        if os.path.isdir(p):
            out.extend(_directory_files(p))
        elif p.endswith((safetensors_files.INDEX_SUFFIX, safetensors_files.FILE_SUFFIX)):
            out.append(("safetensors", p))
        elif p.endswith(_TORCH_EXT):
            out.append(("torch", p))
        else:
            raise ParityError(f"{p}: unsupported file type (accepted: .safetensors, *.safetensors.index.json, .pt, .pth, .bin, or a directory)")
        if not os.access(out[-1][1], os.R_OK):
            raise ParityError(f"{out[-1][1]}: not readable (permission denied)")
    return out


def iter_entries(files: list[tuple[str, str]], trust_pickle: bool, notes: list[str]) -> Iterator[TensorEntry]:
    for kind, f in files:
        if kind == "safetensors":
            yield from safetensors_entries(f)
        else:
            yield from torch_entries(f, trust_pickle, notes)
