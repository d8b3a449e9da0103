"""Offline conversion: BF16 Hugging Face checkpoint -> MXFP4 checkpoint the engines load.

``convert_checkpoint(src, dst, fmt)`` (CLI: ``megatron-qat export SRC --format F --out DST``):

- family from ``config.json`` (:func:`megatron_qat.layouts.family_from_config`, or ``family=``);
  ``gpt-oss`` needs family ``gpt_oss`` (fused ``gate_up_proj [E, H, 2I]`` interleaved,
  ``down_proj [E, I, H]``), ``compressed-tensors`` a per-expert family (qwen3_moe, qwen2_moe,
  deepseek_v3/v2, mixtral; per-expert ``[out, in]`` weights or transformers-v5 fused
  ``[E, out, in]`` tensors, split per expert);
- every routed-expert weight (:func:`megatron_qat.layouts.classify`) is encoded with the training
  numerics along in_features (:func:`megatron_qat.layouts.blocked_view`), one tensor at a time;
  every other tensor is copied unchanged (same dtype and bytes);
- writes ``config.json`` (+ ``quantization_config`` and a ``megatron_qat`` provenance record,
  :mod:`~.hf_config`), the safetensors shards and index, and copies the other files;
- refuses, before writing anything that stays: an already-quantized source, non-floating expert
  weights, ``in_features % 32 != 0``, a family/format mismatch, non-finite weights (names the
  tensor and row); output goes to a temporary directory renamed to ``dst`` at the end.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch

from .. import layouts
from .checkpoint import CONFIG_NAME, INDEX_NAME, AtomicDir, Progress, ShardWriter, copy_side_files, open_source, write_json
from .codec import ExportError, check_in_features, raise_if_nonfinite
from .formats import CT_PACKED, CT_SCALE, GPT_OSS_BLOCKS, GPT_OSS_SCALES, PER_EXPERT_FAMILIES, gpt_oss_blocks
from .hf_config import compressed_tensors_quantization_config, gpt_oss_quantization_config, provenance

OFFLINE_FORMATS = ("gpt-oss", "compressed-tensors")
_QUANTIZED_SUFFIXES = ("_blocks", "_scales", ".weight_packed", ".weight_scale", ".weight_scale_inv", ".weight_global_scale", ".qweight", ".scales")
_FLOAT_DTYPES = ("BF16", "F16", "F32")


def resolve_family(fmt: str, config: dict, family: str | None) -> str:
    if fmt not in OFFLINE_FORMATS:
        raise ExportError(f"--format {fmt!r}: accepted formats are {', '.join(OFFLINE_FORMATS)}")
    family = layouts.check_family(family) if family else layouts.family_from_config(config)
    if fmt == "gpt-oss" and family != "gpt_oss":
        raise ExportError(f"--format gpt-oss needs a gpt_oss checkpoint (config.json family: {family}); use --format compressed-tensors")
    if fmt == "compressed-tensors" and family not in PER_EXPERT_FAMILIES:
        raise ExportError(
            f"--format compressed-tensors needs per-expert gate/up/down experts (family {family} is not one of "
            f"{', '.join(PER_EXPERT_FAMILIES)}); for gpt_oss use --format gpt-oss"
        )
    return family


def preflight(source, family: str, block_size: int) -> tuple[int, int, list[str]]:
    """Check every tensor's metadata before reading data. Returns (tensor count, bytes, the
    compressed-tensors ignore list: every non-expert 2-D ``*.weight`` module)."""
    qc = source.config.get("quantization_config")
    if qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise ExportError(f"{source.root}/{CONFIG_NAME}: the source is already quantized (quantization_config quant_method {method!r}); export needs a BF16 checkpoint")
    count = nbytes = experts = 0
    ignore = []
    expert_shapes = []
    for _, name, shape, dtype in source.entries():
        count += 1
        nbytes += _numel(shape) * _DTYPE_BYTES.get(dtype, 1)
        if name.endswith(_QUANTIZED_SUFFIXES):
            raise ExportError(f"{name}: the source holds quantized tensors (a {name.rsplit('.', 1)[-1].rsplit('_', 1)[-1]} tensor); export needs a BF16 checkpoint")
        info = layouts.classify(name, shape, family)
        if info is None:
            if name.endswith(".weight") and len(shape) == 2:
                ignore.append(name[: -len(".weight")])
            continue
        if info.family == "megatron":
            raise ExportError(f"{name}: a Megatron tensor name; export a live Megatron model with megatron_qat.export.export_mxfp4, or convert to HF first")
        if dtype not in _FLOAT_DTYPES:
            raise ExportError(f"{name}: routed-expert weight of dtype {dtype}; export needs BF16/F16/F32 weights (the source looks quantized)")
        check_in_features(name, shape[info.in_dim], block_size)
        expert_shapes.append((name, shape))
        experts += 1
    if experts == 0:
        raise ExportError(f"{source.root}: no routed-expert weights of family {family} found; nothing to convert")
    layouts.check_fused_pairs(expert_shapes, family)
    return count, nbytes, ignore


_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _quantize(t: torch.Tensor, name: str, block_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` ``[..., out, in]`` -> (codes, scales) on the CPU; refuses non-finite weights."""
    from .. import mxfp4

    raise_if_nonfinite(t, name)
    codes, scales = mxfp4.quantize(t.to(device), block_size)
    return codes.cpu(), scales.cpu()


def output_plan(name: str, shape: tuple[int, ...], info, fmt: str, family: str) -> list[tuple[str, str, tuple]]:
    """Where one routed-expert source tensor goes: ``(codes name, scales name, index)`` per output,
    ``index`` selecting its part of the blocked view ``[..., out, in]`` (``()`` = all of it)."""
    if fmt == "gpt-oss":
        base = layouts.hf_expert_names("gpt_oss", info.layer)[info.role]
        return [(base + GPT_OSS_BLOCKS, base + GPT_OSS_SCALES, ())]
    if not info.fused:
        module = name[: -len(".weight")]
        return [(f"{module}.{CT_PACKED}", f"{module}.{CT_SCALE}", ())]
    # transformers-v5 fused [E, out, in]: one output per expert (gate_up CONCAT: first half gate).
    names = layouts.hf_expert_names(family, info.layer)
    out_rows = shape[info.out_dim]
    plan = []
    for e in range(shape[info.expert_dim]):
        if info.role == "gate_up":
            if info.glu != "concat":
                raise ExportError(f"{name}: gate/up layout {info.glu!r} cannot be split into per-expert gate_proj/up_proj")
            half = out_rows // 2
            parts = [("gate", slice(0, half)), ("up", slice(half, out_rows))]
        else:
            parts = [(info.role, slice(0, out_rows))]
        for role, rows in parts:
            module = names[role].format(E=e)[: -len(".weight")]
            plan.append((f"{module}.{CT_PACKED}", f"{module}.{CT_SCALE}", (e, rows)))
    return plan


def convert_tensor(name: str, t: torch.Tensor, info, fmt: str, family: str, block_size: int, device: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The output pairs of one routed-expert source tensor (:func:`output_plan`)."""
    codes, scales = _quantize(layouts.blocked_view(t, info), name, block_size, device)
    for codes_name, scales_name, index in output_plan(name, tuple(t.shape), info, fmt, family):
        c, s = codes[index], scales[index]
        if fmt == "gpt-oss":
            c = gpt_oss_blocks(c, block_size)
        yield codes_name, (c.clone() if index else c)
        yield scales_name, (s.clone() if index else s)


def convert_checkpoint(
    src: str, dst: str, fmt: str, *, family: str | None = None, device: str = "cpu", block_size: int = 32,
    max_shard_bytes: int = 2 << 30, progress: bool = True,
) -> dict:
    """Convert ``src`` to ``dst`` (see the module docstring). Returns a summary dict
    (``expert_tensors``, ``copied_tensors``, ``bytes_written``, ``dst``)."""
    if device != "cpu" and not torch.cuda.is_available() and device.startswith("cuda"):
        raise ExportError(f"--device {device}: CUDA is not available on this machine")
    source = open_source(src)
    family = resolve_family(fmt, source.config, family)
    count, nbytes, ignore = preflight(source, family, block_size)
    experts = copied = 0
    with AtomicDir(dst) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        bar = Progress(count, nbytes, enabled=progress)
        for name, t in source.tensors():
            info = layouts.classify(name, tuple(t.shape), family)
            if info is None:
                writer.add(name, t)
                copied += 1
            else:
                for out_name, out in convert_tensor(name, t, info, fmt, family, block_size, device):
                    writer.add(out_name, out)
                experts += 1
            bar.step(t.numel() * t.element_size())
            del t
        weight_map = writer.finish()
        config = dict(source.config)
        if fmt == "gpt-oss":
            config["quantization_config"] = gpt_oss_quantization_config()
        else:
            config["quantization_config"] = compressed_tensors_quantization_config(ignore, block_size)
        config["megatron_qat"] = provenance(fmt, family, block_size)
        write_json(os.path.join(tmp, CONFIG_NAME), config)
        write_json(os.path.join(tmp, INDEX_NAME), {"metadata": {"total_size": writer.total_bytes}, "weight_map": weight_map})
        copy_side_files(source.root, tmp, source.files)
    return {"dst": os.path.abspath(dst), "expert_tensors": experts, "copied_tensors": copied, "bytes_written": writer.total_bytes}
