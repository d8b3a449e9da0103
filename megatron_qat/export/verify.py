"""Check an exported MXFP4 checkpoint against its BF16 source: the shipped bytes, decoded, equal
``fake_quantize(source)`` bit for bit, and every other tensor is byte-identical.

For each source tensor: a routed-expert weight (:func:`megatron_qat.layouts.classify`) is
fake-quantized along in_features (:func:`megatron_qat.mxfp4.fake_quantize` of the blocked view)
and compared, on ``int16`` / ``int32`` views, with :func:`megatron_qat.mxfp4.dequantize` of the
destination's codes and scales (names from :func:`megatron_qat.export.offline.output_plan`); any
other tensor must be present with the same dtype, shape and bytes. Destination tensors no source
tensor accounts for are reported as extra. The format is read from the destination's
``config.json`` (``quant_method``).

Exit codes follow ``megatron-qat parity``: 0 identical everywhere, 1 a difference (or missing /
extra tensor), 2 usage error, including a source the export itself refuses (already quantized,
no routed-expert weight, a family the destination's format cannot name): comparing such a source
would "pass" with no expert tensor checked.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from .. import layouts
from ..numerics.format import INT_VIEW_DTYPES
from .checkpoint import CONFIG_NAME, open_source
from .codec import ExportError
from .offline import output_plan, preflight, resolve_family

EXIT_EQUAL, EXIT_MISMATCH, EXIT_ERROR = 0, 1, 2


@dataclass
class VerifyResult:
    format: str
    expert_tensors: int = 0
    copied_tensors: int = 0
    mismatches: list = field(default_factory=list)  # one-line descriptions
    missing: list = field(default_factory=list)
    extra: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.mismatches or self.missing or self.extra)

    @property
    def exit_code(self) -> int:
        return EXIT_EQUAL if self.ok else EXIT_MISMATCH

    def summary(self) -> str:
        head = "EXPORT PARITY OK" if self.ok else "EXPORT PARITY MISMATCH"
        text = (f"{head}: {self.expert_tensors} expert tensor(s) decode to fake_quantize(source) bit for bit, "
                f"{self.copied_tensors} other tensor(s) byte-identical" if self.ok else
                f"{head}: {len(self.mismatches)} mismatch(es), {len(self.missing)} missing, {len(self.extra)} extra")
        lines = [text] + [f"  mismatch: {m}" for m in self.mismatches[:20]]
        lines += [f"  missing in destination: {m}" for m in self.missing[:20]]
        lines += [f"  extra in destination: {m}" for m in self.extra[:20]]
        return "\n".join(lines)


def detect_format(dst_root: str) -> str:
    path = os.path.join(dst_root, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            qc = json.load(f).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError) as exc:
        raise ExportError(f"{path}: cannot read the exported config ({type(exc).__name__})") from None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method == "mxfp4":
        return "gpt-oss"
    if method == "compressed-tensors" and qc.get("format") == "mxfp4-pack-quantized":
        return "compressed-tensors"
    raise ExportError(f"{path}: quantization_config quant_method {method!r} is not an MXFP4 export (mxfp4, or compressed-tensors mxfp4-pack-quantized)")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (integer views: -0.0 != +0.0, NaN payloads compared)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = INT_VIEW_DTYPES.get(a.dtype, torch.uint8)
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def verify_export(dst: str, src: str, *, family: str | None = None, block_size: int = 32) -> VerifyResult:
    """Compare ``dst`` (an export) with its BF16 source ``src``; see the module docstring."""
    from safetensors import safe_open

    from .. import mxfp4

    source = open_source(src)
    shipped = open_source(dst)
    fmt = detect_format(shipped.root)
    # the same refusals as the export (a quantized source, no routed experts, a family the format
    # cannot name, a wrong --layout): a check that compared no expert tensor never passes
    family = resolve_family(fmt, source.config, family)
    preflight(source, family, block_size)
    where = {}
    for path, name, _, _ in shipped.entries():
        where[name] = path
    used = set()
    result = VerifyResult(fmt)
    handles = {}

    def read(name):
        path = where.get(name)
        if path is None:
            return None
        if path not in handles:
            handles[path] = safe_open(path, "pt")
        used.add(name)
        return handles[path].get_tensor(name)

    for name, t in source.tensors():
        info = layouts.classify(name, tuple(t.shape), family)
        if info is None:
            got = read(name)
            if got is None:
                result.missing.append(name)
            elif not _same_bits(got, t):
                result.mismatches.append(f"{name}: copied tensor differs (dtype {got.dtype} vs {t.dtype}, shape {tuple(got.shape)} vs {tuple(t.shape)})")
            result.copied_tensors += 1
            continue
        result.expert_tensors += 1
        expected = mxfp4.fake_quantize(layouts.blocked_view(t, info).contiguous(), block_size)
        for codes_name, scales_name, index in output_plan(name, tuple(t.shape), info, fmt, family):
            codes, scales = read(codes_name), read(scales_name)
            if codes is None or scales is None:
                result.missing.extend(n for n, v in ((codes_name, codes), (scales_name, scales)) if v is None)
                continue
            if codes.dtype != torch.uint8 or scales.dtype != torch.uint8:
                result.mismatches.append(f"{codes_name}: codes/scales must be uint8, got {codes.dtype}/{scales.dtype}")
                continue
            if fmt == "gpt-oss":
                codes = codes.reshape(*codes.shape[:-2], codes.shape[-2] * codes.shape[-1])
            want = expected[index]
            try:
                decoded = mxfp4.dequantize(codes, scales, want.dtype, block_size)
            except (TypeError, ValueError) as exc:
                result.mismatches.append(f"{codes_name}: cannot decode ({exc})")
                continue
            if decoded.shape != want.shape:
                result.mismatches.append(f"{codes_name}: decodes to shape {tuple(decoded.shape)}, source gives {tuple(want.shape)}")
            elif not _same_bits(decoded, want):
                diff = (decoded.view(INT_VIEW_DTYPES[want.dtype]) != want.view(INT_VIEW_DTYPES[want.dtype])).nonzero()[0].tolist()
                result.mismatches.append(f"{codes_name}: decoded value differs from fake_quantize({name}) at {diff}")
    result.extra = sorted(set(where) - used)
    return result
