"""Offline conversion: BF16 Hugging Face checkpoint -> MXFP4 checkpoint the engines load.

``convert_checkpoint(src, dst, fmt)`` (CLI: ``megatron-qat export SRC --format F --out DST``):

- family from ``config.json`` (:func:`megatron_qat.layouts.family_from_config`, or ``family=``,
  which may override the config only with a family stored alike: :func:`megatron_qat.layouts.check_override`);
  ``gpt-oss`` needs family ``gpt_oss`` (fused ``gate_up_proj [E, H, 2I]`` interleaved,
  ``down_proj [E, I, H]``), ``compressed-tensors`` a per-expert family (qwen3_moe, qwen2_moe,
  deepseek_v3/v2, mixtral; per-expert ``[out, in]`` weights or transformers-v5 fused
  ``[E, out, in]`` tensors, split per expert); Llama-4 (concatenated gate/up in a fused
  ``[E, in, out]`` tensor) has no format here;
- every routed-expert weight (:func:`megatron_qat.layouts.classify`) is encoded with the training
  numerics along in_features (:func:`megatron_qat.layouts.blocked_view`), one tensor at a time;
  every other tensor is copied unchanged (same dtype and bytes);
- writes ``config.json`` (+ ``quantization_config`` and a ``megatron_qat`` provenance record,
  :mod:`~.hf_config`), the safetensors shards and index, and copies the other files;
- refuses, before writing anything that stays: an already-quantized source, non-floating expert
  weights, ``in_features % block_size != 0``, a family/format mismatch, a fused expert tensor not
  where the format's loaders look for it, non-finite weights (names the tensor and row); output
  goes to ``DST.partial-*`` (:class:`megatron_qat.tools.atomic.AtomicDirectory`), renamed to
  ``dst`` at the end and removed on any error or signal.
"""

from __future__ import annotations

import math
import os
import re
from typing import Iterator

import torch

from .. import layouts
from ..mxfp4.payload import MXPayload
from ..numerics.rules import RECIPES, Recipe, Rule
from ..tools.atomic import AtomicDirectory, write_json
from ..tools.progress import Progress, gib
from .checkpoint import CONFIG_NAME, INDEX_NAME, ShardWriter, Source, copy_side_files, open_source
from .codec import ExportError, check_in_features, raise_if_nonfinite
from .formats import CT_PACKED, CT_SCALE, ENGINE_FORMATS, GPT_OSS_BLOCKS, GPT_OSS_SCALES, PER_EXPERT_FAMILIES, check_numerics
from .hf_config import compressed_tensors_quantization_config, gpt_oss_quantization_config, provenance

OFFLINE_FORMATS = ENGINE_FORMATS
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_device(device: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (a visible GPU); ExportError otherwise."""
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise ExportError(f"--device {device!r}: accepted values are cpu, cuda, cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ExportError(f"--device {device}: no CUDA GPU is visible on this machine (use --device cpu)")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ExportError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) visible")
    return device


def shard_bytes(gib_text) -> int:
    """``--max-shard-gib``: a finite positive number of GiB -> bytes (at least 1)."""
    try:
        value = float(gib_text)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value <= 0 or value * 2**30 > 2**62:
        raise ExportError(f"--max-shard-gib {gib_text}: must be a positive, finite number of GiB (e.g. 2)")
    return max(1, int(value * 2**30))


def resolve_family(fmt: str, source: Source, family: str | None) -> str:
    """The checkpoint family ``fmt`` is written for: ``family`` (``--layout``) or the source's
    ``config.json``; ExportError / LayoutError (one line, saying where the family came from)."""
    if fmt not in OFFLINE_FORMATS:
        raise ExportError(f"--format {fmt!r}: accepted formats are {', '.join(OFFLINE_FORMATS)}")
    config_path = os.path.join(source.root, CONFIG_NAME)
    if family is not None:
        layouts.check_family(family)
        try:
            config_family = layouts.family_from_config(source.config)
        except layouts.LayoutError:  # config.json names no known family: --layout decides
            config_family = None
        if config_family is not None:
            layouts.check_override(family, config_family, config_path)
        origin = "from --layout"
    else:
        try:
            family = layouts.family_from_config(source.config)
        except layouts.LayoutError as exc:
            raise layouts.LayoutError(f"{config_path}: {exc}") from None
        origin = f"from {config_path}"
    if family in ("llama4", "megatron"):
        why = ("Llama-4 stores gate/up concatenated in a fused [E, in, out] tensor: gpt-oss needs them interleaved "
               "(family gpt_oss) and compressed-tensors needs per-expert gate_proj/up_proj/down_proj tensors "
               f"({', '.join(PER_EXPERT_FAMILIES)})" if family == "llama4" else
               "Megatron checkpoints are exported from the live model (megatron_qat.export.export_mxfp4) or after an HF conversion")
        raise ExportError(f"family {family} ({origin}) has no MXFP4 export format here: {why}")
    if fmt == "gpt-oss" and family != "gpt_oss":
        raise ExportError(f"--format gpt-oss needs a gpt_oss checkpoint (family {family}, {origin}); use --format compressed-tensors")
    if fmt == "compressed-tensors" and family not in PER_EXPERT_FAMILIES:
        raise ExportError(
            f"--format compressed-tensors needs per-expert gate/up/down experts (family {family}, {origin}, is not one of "
            f"{', '.join(PER_EXPERT_FAMILIES)}); for gpt_oss use --format gpt-oss"
        )
    return family


def preflight(source: Source, fmt: str, family: str, block_size: int, rule: Rule) -> tuple[int, int, list[str]]:
    """Check every tensor's metadata before reading data. Returns (tensor count, bytes, the
    compressed-tensors ignore list: every non-expert 2-D ``*.weight`` module)."""
    quantized = source.quantized()
    if quantized:
        raise ExportError(f"{source.path}: already quantized ({quantized}); export needs a BF16 checkpoint")
    check_numerics(fmt, block_size, rule)
    count = nbytes = experts = 0
    ignore = []
    expert_shapes = []
    for t in source.infos():
        count += 1
        nbytes += t.nbytes
        info = layouts.classify(t.name, t.shape, family)
        if info is None:
            if t.name.endswith(".weight") and len(t.shape) == 2:
                ignore.append(t.name[: -len(".weight")])
            continue
        if info.family == "megatron":
            raise ExportError(f"{t.name}: a Megatron tensor name; export a live Megatron model with megatron_qat.export.export_mxfp4, or convert to HF first")
        if not t.quantizable:
            raise ExportError(f"{t.name}: routed-expert weight of dtype {t.dtype_name}; export needs BF16/F16/F32 weights (the source looks quantized)")
        check_in_features(t.name, t.shape[info.in_dim], block_size)
        output_plan(t.name, t.shape, info, fmt, family)  # refuses a tensor the format would misplace
        expert_shapes.append((t.name, t.shape))
        experts += 1
    if experts == 0:
        raise ExportError(f"{source.path}: no routed-expert weights of family {family} found; nothing to convert")
    layouts.check_fused_pairs(expert_shapes, family)
    return count, nbytes, ignore


def output_plan(name: str, shape: tuple[int, ...], info, fmt: str, family: str) -> list[tuple[str, str, tuple]]:
    """Where one routed-expert source tensor goes: ``(codes name, scales name, index)`` per output,
    ``index`` selecting its part of the blocked view ``[..., out, in]`` (``()`` = all of it)."""
    if fmt == "gpt-oss":
        base = layouts.hf_expert_names("gpt_oss", info.layer)[info.role]
        if name != base:
            raise ExportError(
                f"{name}: not where a gpt_oss checkpoint keeps its experts ({base}); the gpt-oss format would move it "
                "there, so the checkpoint is no gpt_oss one (check config.json / --layout)"
            )
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


def convert_tensor(
    name: str, t: torch.Tensor, info, fmt: str, family: str, block_size: int, rule: Rule, device: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """The output pairs of one routed-expert source tensor (:func:`output_plan`); refuses non-finite weights."""
    blocked = layouts.blocked_view(t, info)
    raise_if_nonfinite(blocked, name)
    payload = MXPayload.quantize(blocked.to(device), block_size, rule=rule).cpu()
    for codes_name, scales_name, index in output_plan(name, tuple(t.shape), info, fmt, family):
        part = payload[index].contiguous() if index else payload
        yield codes_name, (part.blocks() if fmt == "gpt-oss" else part.codes)
        yield scales_name, part.scales


def resolve_recipe(name: str | None) -> Recipe:
    """The named recipe (``None``: the one the fake-QAT forward uses, :func:`~.live.training_numerics`)."""
    from .live import training_numerics

    if name is None:
        return training_numerics()[1]
    if name not in RECIPES:
        raise ExportError(f"--recipe {name!r}: accepted values are {', '.join(RECIPES)} (docs/engines.md)")
    return RECIPES[name]


def convert_checkpoint(
    src: str, dst: str, fmt: str, *, family: str | None = None, device: str = "cpu", block_size: int | None = None,
    recipe: str | None = None, max_shard_bytes: int = 2 << 30, progress: bool = True,
) -> dict:
    """Convert ``src`` to ``dst`` (see the module docstring). ``block_size`` / ``recipe`` (a name of
    :data:`megatron_qat.numerics.rules.RECIPES`): ``None`` = those the fake-QAT forward uses
    (``OPEN_TRAINING_MXFP4_BLOCK_SIZE``, default 32; ``MEGATRON_QAT_RECIPE``, default
    ``flashinfer-w4a16``); the bytes are made under the recipe's WEIGHT rule. Returns a summary dict
    (``expert_tensors``, ``copied_tensors``, ``bytes_written``, ``dst``, ``rule``)."""
    from .live import training_numerics

    device = check_device(device)
    block_size = training_numerics()[0] if block_size is None else block_size
    chosen = resolve_recipe(recipe)
    rule = chosen.weights
    output = AtomicDirectory(dst)  # refuses an existing --out before any work
    source = open_source(src)
    family = resolve_family(fmt, source, family)
    count, nbytes, ignore = preflight(source, fmt, family, block_size, rule)
    experts = copied = 0
    with output as tmp, Progress("export", count, nbytes, noun="tensors", show=gib, enabled=progress) as bar:
        writer = ShardWriter(tmp, max_shard_bytes)
        for t_info, t in source.tensors():
            info = layouts.classify(t_info.name, tuple(t.shape), family)
            if info is None:
                writer.add(t_info.name, t)
                copied += 1
            else:
                for out_name, out in convert_tensor(t_info.name, t, info, fmt, family, block_size, rule, device):
                    writer.add(out_name, out)
                experts += 1
            bar.advance(t_info.nbytes, items=1)
            del t
        weight_map = writer.finish()
        config = dict(source.config)
        if fmt == "gpt-oss":
            config["quantization_config"] = gpt_oss_quantization_config()
        else:
            config["quantization_config"] = compressed_tensors_quantization_config(ignore, block_size)
        config["megatron_qat"] = provenance(fmt, family, block_size, rule, chosen.name)
        write_json(os.path.join(tmp, CONFIG_NAME), config)
        write_json(os.path.join(tmp, INDEX_NAME), {"metadata": {"total_size": writer.total_bytes}, "weight_map": weight_map})
        copy_side_files(source.root, tmp, source.files)
    return {"dst": os.path.abspath(dst), "expert_tensors": experts, "copied_tensors": copied, "bytes_written": writer.total_bytes,
            "rule": rule.name}
