"""Check an exported MXFP4 checkpoint against its BF16 source: the shipped bytes, decoded, equal
``fake_quantize(source)`` bit for bit, and every other tensor is byte-identical.

The one door: ``megatron-qat parity DST --source SRC`` and ``megatron-qat export --verify DST
--source SRC`` both run :func:`run_check` (same check, same exit codes, same report).

For each source tensor: a routed-expert weight (:func:`megatron_qat.layouts.classify`) is
fake-quantized along in_features (:func:`megatron_qat.mxfp4.fake_quantize` of the blocked view)
and compared, on ``int16`` / ``int32`` views, with the decode of the destination's codes and scales
(names from :func:`megatron_qat.export.offline.output_plan`); any other tensor must be present with
the same dtype, shape and bytes. Destination tensors no source tensor accounts for are extra. The
format is read from the destination's ``config.json`` (``quant_method``), the block size from its
data (gpt-oss: ``2 x`` the ``*_blocks`` row length; compressed-tensors: the config's ``group_size``)
and the rule from its provenance record (``megatron_qat.rule``; an export without one is checked
under ``--recipe``'s weight rule, default ``MEGATRON_QAT_RECIPE``'s).

Exit codes (:class:`megatron_qat.tools.errors.ExitCode`): 0 identical everywhere, 1 a difference
(or a missing / extra tensor), and only that; 2 a refused input: an unreadable or corrupt file, a
destination that is no MXFP4 export (PATH and ``--source`` swapped gets a hint), a source the
export itself refuses (already quantized, no routed-expert weight, a family the destination's
format cannot name): comparing such a source would "pass" with no expert tensor checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .. import layouts
from ..mxfp4.payload import MXPayload
from ..numerics.rules import RULES, Rule
from ..numerics.format import INT_VIEW_DTYPES
from ..tools.atomic import write_json
from ..tools.errors import ExitCode, ToolError
from .checkpoint import CONFIG_NAME, Source, open_source
from .codec import ExportError
from .formats import GPT_OSS_BLOCKS
from .hf_config import CT_FORMAT
from .offline import output_plan, preflight, resolve_family, resolve_recipe

PARITY_RERUN = "megatron-qat parity {dst} --source {src}"


@dataclass
class VerifyResult:
    format: str
    block_size: int
    rule: Rule
    expert_tensors: int = 0
    copied_tensors: int = 0
    mismatches: list = field(default_factory=list)  # one-line descriptions
    missing: list = field(default_factory=list)
    extra: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.mismatches or self.missing or self.extra)

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.OK if self.ok else ExitCode.MISMATCH

    def summary(self) -> str:
        head = "EXPORT PARITY OK" if self.ok else "EXPORT PARITY MISMATCH"
        text = (f"{head}: {self.expert_tensors} expert tensor(s) decode to fake_quantize(source) bit for bit (rule {self.rule.name}), "
                f"{self.copied_tensors} other tensor(s) byte-identical" if self.ok else
                f"{head}: {len(self.mismatches)} mismatch(es), {len(self.missing)} missing, {len(self.extra)} extra")
        lines = [text] + [f"  mismatch: {m}" for m in self.mismatches[:20]]
        lines += [f"  missing in destination: {m}" for m in self.missing[:20]]
        lines += [f"  extra in destination: {m}" for m in self.extra[:20]]
        return "\n".join(lines)


def detect_format(shipped: Source) -> str | None:
    """``"gpt-oss"`` / ``"compressed-tensors"`` for an MXFP4 export's config, else ``None``."""
    qc = shipped.config.get("quantization_config") or {}
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method == "mxfp4":
        return "gpt-oss"
    if method == "compressed-tensors" and qc.get("format") == CT_FORMAT:
        return "compressed-tensors"
    return None


def export_block_size(shipped: Source, fmt: str) -> int:
    """The block size the export's data carries (ExportError if it says none)."""
    where = os.path.join(shipped.root, CONFIG_NAME)
    if fmt == "gpt-oss":
        blocks = [t for t in shipped.infos() if t.name.endswith(GPT_OSS_BLOCKS)]
        if not blocks or len(blocks[0].shape) < 2:
            raise ExportError(f"{shipped.path}: a gpt-oss MXFP4 config ({where}) but no *{GPT_OSS_BLOCKS} tensor [..., K/32, 16]")
        return 2 * blocks[0].shape[-1]
    groups = shipped.config["quantization_config"].get("config_groups") or {}
    sizes = {g.get("weights", {}).get("group_size") for g in groups.values() if isinstance(g, dict)}
    if len(sizes) != 1 or not isinstance(next(iter(sizes)), int):
        raise ExportError(f"{where}: compressed-tensors config_groups give group_size {sorted(map(str, sizes))}; expected one integer")
    return sizes.pop()


def export_rule(shipped: Source, recipe: str | None) -> Rule:
    """The rule the export was made under: its provenance ``megatron_qat.rule``; ``recipe`` (a name,
    e.g. ``--recipe``) must agree with it. An export without the record: ``recipe``'s weight rule
    (``None``: the one the fake-QAT forward uses, ``MEGATRON_QAT_RECIPE``)."""
    where = os.path.join(shipped.root, CONFIG_NAME)
    record = shipped.config.get("megatron_qat")
    named = record.get("rule") if isinstance(record, dict) else None
    if named is None:
        return resolve_recipe(recipe).weights
    if named not in RULES:
        raise ExportError(f"{where}: megatron_qat.rule {named!r} is not a known rule ({', '.join(RULES)})")
    rule = RULES[named]
    if recipe is not None and resolve_recipe(recipe).weights is not rule:
        raise ExportError(
            f"--recipe {recipe} (weight rule {resolve_recipe(recipe).weights.name}) contradicts {where}, whose bytes were made "
            f"under rule {rule.name}; drop --recipe to check them under it"
        )
    return rule


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (integer views: -0.0 != +0.0, NaN payloads compared)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = INT_VIEW_DTYPES.get(a.dtype, torch.uint8)
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def _not_an_export(shipped: Source, source: Source, rerun: str) -> ToolError:
    if detect_format(source) is not None:
        return ToolError(
            f"{shipped.path} and {source.path} look swapped: {source.path} is the MXFP4 export and {shipped.path} a BF16 "
            f"checkpoint; run: {rerun.format(dst=source.path, src=shipped.path)}"
        )
    return ToolError(
        f"{shipped.path}: not an MXFP4 export (its {CONFIG_NAME} has no quantization_config quant_method mxfp4, or "
        f"compressed-tensors {CT_FORMAT}); the path to check comes first: {rerun.format(dst='DST', src='SRC')}"
    )


def verify_export(
    dst: str, src: str, *, family: str | None = None, recipe: str | None = None, rerun: str = PARITY_RERUN
) -> VerifyResult:
    """Compare ``dst`` (an export) with its BF16 source ``src``; see the module docstring.
    ``recipe``: a recipe name the export's rule must be the weight rule of (see :func:`export_rule`).
    ``rerun``: the command line a hint shows, with ``{dst}`` / ``{src}`` placeholders."""
    shipped = open_source(dst)
    source = open_source(src)
    fmt = detect_format(shipped)
    if fmt is None:
        raise _not_an_export(shipped, source, rerun)
    block_size = export_block_size(shipped, fmt)
    rule = export_rule(shipped, recipe)
    # the same refusals as the export (a quantized source, no routed experts, a family the format
    # cannot name, a wrong --layout): a check that compared no expert tensor never passes
    family = resolve_family(fmt, source, family)
    preflight(source, fmt, family, block_size, rule)
    by_name = {t.name: t for t in shipped.infos()}
    used = set()
    result = VerifyResult(fmt, block_size, rule)

    def read(name):
        info = by_name.get(name)
        if info is None:
            return None
        used.add(name)
        return shipped.checkpoint.read(info)

    for t_info, t in source.tensors():
        name = t_info.name
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
        expected = MXPayload.quantize(layouts.blocked_view(t, info).contiguous(), block_size, rule=rule).dequantize(t.dtype)
        for codes_name, scales_name, index in output_plan(name, tuple(t.shape), info, fmt, family):
            codes, scales = read(codes_name), read(scales_name)
            if codes is None or scales is None:
                result.missing.extend(n for n, v in ((codes_name, codes), (scales_name, scales)) if v is None)
                continue
            try:
                shipped_payload = (MXPayload.from_blocks(codes, scales, rule) if fmt == "gpt-oss"
                                   else MXPayload(codes, scales, block_size, rule))
                decoded = shipped_payload.dequantize(t.dtype)
            except (TypeError, ValueError) as exc:
                result.mismatches.append(f"{codes_name}: cannot decode ({exc})")
                continue
            want = expected[index] if index else expected
            if decoded.shape != want.shape:
                result.mismatches.append(f"{codes_name}: decodes to shape {tuple(decoded.shape)}, source gives {tuple(want.shape)}")
            elif not _same_bits(decoded, want):
                view = INT_VIEW_DTYPES[want.dtype]
                diff = (decoded.view(view) != want.contiguous().view(view)).nonzero()[0].tolist()
                result.mismatches.append(f"{codes_name}: decoded value differs from fake_quantize({name}) at {diff}")
    result.extra = sorted(set(by_name) - used)
    return result


def run_check(dst: str, src: str, *, family: str | None, recipe: str | None, rerun: str, json_path: str | None = None,
              report: dict | None = None) -> ExitCode:
    """The door both CLIs use: :func:`verify_export`, its summary on stdout, and (``json_path``) the
    report ``{**report, "mode": "export", ...}``. Returns the exit code (0 identical, 1 a difference);
    refusals raise :class:`~megatron_qat.tools.errors.ToolError` (exit 2)."""
    result = verify_export(dst, src, family=family, recipe=recipe, rerun=rerun)
    print(result.summary())
    if json_path:
        doc = {
            **(report or {}),
            "mode": "export",
            "source": src,
            "status": "equal" if result.ok else "mismatch",
            "exit_code": int(result.exit_code),
            "format": result.format,
            "block_size": result.block_size,
            "rule": result.rule.name,
            "expert_tensors": result.expert_tensors,
            "copied_tensors": result.copied_tensors,
            "mismatches": result.mismatches,
            "missing": result.missing,
            "extra": result.extra,
        }
        try:
            write_json(json_path, doc)
        except OSError as exc:
            raise ToolError(f"--json {json_path}: cannot write the report ({exc.strerror or type(exc).__name__})") from None
    return result.exit_code
