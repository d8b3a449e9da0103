"""One parity run: resolve sources and layouts, pick the reference, compare tensor by tensor, report.

:func:`run` returns the exit code (:class:`megatron_qat.tools.errors.ExitCode`): 0 every selected
tensor compared in full (or the ``--sample-rows`` sample) and identical; 1 any mismatch; 3
identical where compared but incomplete (tensors skipped, rows excluded as non-finite, a tensor
with no finite row, nothing compared; ``--allow-incomplete`` turns 3 into 0 unless nothing at all
was compared). A usage or environment error is raised (a
:class:`~megatron_qat.tools.errors.ToolError`); ``megatron_qat/cli.py`` prints it as one line
(exit 2) after :func:`record_error` wrote it into the ``--json`` report where that path is writable.
``PATH --source SRC`` is the export check, :func:`megatron_qat.export.verify.run_check`.

The rule checked is the WEIGHT rule of ``--recipe`` (default ``MEGATRON_QAT_RECIPE``, else
``flashinfer-w4a16``: FlashInfer's MXFP4); a recipe with an MXFP8 activation rule also compares
that with FlashInfer's activation quantizer where it runs (:mod:`.activations`): a mismatch there
is exit 1, a comparison that could not run makes the run incomplete.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import time

import torch

from ..tools.atomic import probe_writable, write_json
from ..tools.errors import ExitCode
from .compare import NOT_COMPARED, BatchInput, TensorResult, compare_batch
from .errors import ParityError
from .options import DEFAULT_INCLUDE
from .report import SCHEMA, summary_line, table, totals
from .rows import plan_batches, sampled_rows
from .sources import TensorEntry, iter_entries, resolve, synthetic_entries
from .tensor_layout import assign, check_pairs, run_family, synthetic_layout


def _json_problem(path: str) -> str | None:
    """Why ``--json PATH`` cannot be written (checked before the run), or None."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"--json {path}: is a directory"
    if not os.path.isdir(parent):
        return f"--json {path}: directory {parent} does not exist"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"--json {path}: not writable"
    why = probe_writable(parent)
    return None if why is None else f"--json {path}: directory {parent} is not writable ({why})"


def _write_report(path: str, doc: dict) -> None:
    """The one JSON writer; an OSError (disk full, directory removed meanwhile) as a one-line ParityError."""
    try:
        write_json(path, doc)
    except OSError as exc:
        raise ParityError(f"--json {path}: cannot write the report ({exc.strerror or type(exc).__name__})") from None


def _check_args(args: argparse.Namespace) -> None:
    for flag in ("limit", "sample_rows", "chunk_elements"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ParityError(f"--{flag.replace('_', '-')}={value}: must be a positive integer")
    if args.json and _json_problem(args.json):
        raise ParityError(_json_problem(args.json))
    if args.synthetic and args.paths:
        raise ParityError("--synthetic checks the built-in tensors and takes no PATH")
    if args.layout and (args.synthetic or not args.paths):
        raise ParityError(f"--layout {args.layout} applies to checkpoints; the built-in --synthetic tensors have their own layout")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ParityError("--device cuda: no CUDA GPU is visible (use --device cpu)")


def _no_match(entries: list[TensorEntry], shown: str, paths: list[str]) -> ParityError:
    from ..export.checkpoint import QUANTIZED_SUFFIXES

    quantized = next((e.name for e in entries if e.name.endswith(QUANTIZED_SUFFIXES)), None)
    if quantized is not None:
        return ParityError(
            f"{', '.join(paths)} holds quantized tensors ({quantized.rsplit('.', 1)[-1]}), not BF16 weights: "
            "to check an MXFP4 export against its BF16 checkpoint, add --source SRC"
        )
    example = ", ".join(e.name for e in entries[:3])
    return ParityError(f"no tensor name in {', '.join(paths)} matches {shown} ({len(entries)} tensors" + (f", e.g. {example})" if entries else ")"))


def _select(entries: list[TensorEntry], pattern: str, paths: list[str]) -> list[TensorEntry]:
    if pattern == DEFAULT_INCLUDE:
        shown = "the default --include (routed-expert weights; --help shows the pattern)"
    else:
        shown = f"--include {shlex.quote(pattern)}"  # pasteable back into a shell, backslashes as typed
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ParityError(f"{shown}: not a valid regular expression ({exc})") from exc
    selected = [e for e in entries if regex.search(e.name)]
    if not selected:
        raise _no_match(entries, shown, paths)
    return selected


def _compare_tensor(entry: TensorEntry, args, reference, ours, progress) -> TensorResult:
    result = TensorResult(
        entry.name, entry.file, list(entry.shape), entry.dtype_name, entry.numel, layout=entry.layout,
        blocked_shape=list(entry.blocked_shape), rows_total=entry.rows,
    )
    reason = entry.skip_reason(reference.block_size) or reference.unsupported(entry.dtype)
    if reason:
        result.status = reason
        return result
    start = time.perf_counter()
    k = entry.k
    result.impl = ours.resolved_impl(torch.zeros(1, k, dtype=entry.dtype))
    rows = sampled_rows(entry.rows, args.sample_rows)
    result.rows_selected = entry.rows if rows is None else len(rows)
    for batch in plan_batches(entry.rows, entry.matrix_rows, rows, args.chunk_elements // k):
        x = torch.cat([entry.read_rows(a, b) for a, b in batch])
        ids = torch.cat([torch.arange(a, b) for a, b in batch])
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            result.nonfinite_values += int((~finite).sum())
            keep = finite.all(dim=1)
            result.excluded_rows += int((~keep).sum())
            x, ids = x[keep], ids[keep]
        if x.shape[0]:
            batch_input = BatchInput(x.contiguous(), ids, entry.blocked_shape, entry.stored_index)
            compare_batch(result, batch_input, reference.quantize(x), ours.run(x), not reference.decodes_negative_zero)
        progress.advance(sum(b - a for a, b in batch) * k)
    result.elapsed_s = round(time.perf_counter() - start, 4)
    result.finish()
    return result


def incomplete_reasons(results: list[TensorResult]) -> list[str]:
    """Why the comparison covered less than was selected ([] = complete)."""
    reasons = []
    skipped = [r for r in results if r.skipped]
    if skipped:
        reasons.append(f"{len(skipped)} tensor(s) skipped")
    empty = [r for r in results if r.status == NOT_COMPARED]
    if empty:
        reasons.append(f"{len(empty)} tensor(s) with no finite row")
    partial = [r for r in results if r.rows_compared and r.excluded_rows]
    if partial:
        reasons.append(f"{sum(r.excluded_rows for r in partial)} row(s) holding non-finite values excluded from {len(partial)} tensor(s)")
    return reasons


def outcome(results: list[TensorResult], allow_incomplete: bool, activations: dict | None = None) -> tuple[str, ExitCode, list[str]]:
    """(status, exit code, incomplete reasons) of a finished run (``activations``: :mod:`.activations`' result)."""
    reasons = incomplete_reasons(results)
    if activations is not None and activations["status"] == "not compared":
        reasons.append(f"activation rule {activations['rule']} not compared: {activations['reason']}")
    if any(r.mismatched for r in results) or (activations is not None and activations["status"] == "mismatch"):
        return "mismatch", ExitCode.MISMATCH, reasons
    if not any(r.rows_compared for r in results):
        return "nothing compared", ExitCode.INCOMPLETE, reasons  # never a pass, --allow-incomplete or not
    if reasons:
        return "incomplete", ExitCode.OK if allow_incomplete else ExitCode.INCOMPLETE, reasons
    return "equal", ExitCode.OK, reasons


def _recipe(args: argparse.Namespace):
    from .. import config
    from ..numerics.rules import RECIPES

    return RECIPES[args.recipe or config.recipe_name()]


def _base_doc(args: argparse.Namespace, block_size: int | None) -> dict:
    from megatron_qat import __version__

    synthetic = args.synthetic or not args.paths
    try:
        recipe = _recipe(args)
    except ValueError:  # a malformed MEGATRON_QAT_RECIPE: the error being recorded
        recipe = None
    return {
        "schema": SCHEMA,
        "tool_version": __version__,
        "status": "error",
        "exit_code": int(ExitCode.ERROR),
        "sources": ["synthetic"] if synthetic else list(args.paths),
        "include": None if synthetic else args.include,
        "block_size": block_size,
        "recipe": recipe.name if recipe else None,
        "rule": recipe.weights.name if recipe else None,
        "options": {
            "limit": args.limit, "sample_rows": args.sample_rows, "chunk_elements": args.chunk_elements,
            "layout": args.layout, "allow_incomplete": args.allow_incomplete,
        },
    }


def _run_export_check(args: argparse.Namespace) -> int:
    """``parity DST --source SRC``: the export check, through the one door both CLIs use."""
    if len(args.paths) != 1 or args.synthetic:
        raise ParityError("--source SRC checks one MXFP4 export: give exactly one PATH (the export directory)")
    from ..export.verify import PARITY_RERUN, run_check

    return run_check(args.paths[0], args.source, family=args.layout, recipe=args.recipe, rerun=PARITY_RERUN,
                     json_path=args.json, report=_base_doc(args, None))


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    _check_args(args)
    if args.source:
        return _run_export_check(args)
    synthetic = args.synthetic or not args.paths
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    notes: list[str] = []
    if synthetic:
        selected = synthetic_entries()
        layout = {"family": None, "source": "synthetic", "note": None}
    else:
        files = resolve(args.paths)
        family, source, why = run_family(args.layout, args.paths, notes)
        layout = {"family": family, "source": source, "note": why}
        selected = _select(list(iter_entries(files, args.trust_pickle, notes)), args.include, args.paths)
    if args.limit is not None:
        selected = selected[: args.limit]
    for entry in selected:  # every layout is decided (or refused) before anything is compared
        if synthetic:
            synthetic_layout(entry)
        else:
            assign(entry, layout["family"], layout["note"])
    if not synthetic:
        check_pairs(selected, layout["family"])

    from ..tools.progress import Progress
    from .activations import check_activations
    from .references import Ours, choose_reference

    recipe = _recipe(args)
    reference = choose_reference(args.reference, args.allow_unsupported_gpu, recipe.weights)
    block_size = reference.block_size
    compared = [e for e in selected if not e.skip_reason(block_size) and not reference.unsupported(e.dtype)]
    ours = Ours(device, args.impl, block_size, recipe.weights)
    ours.check({e.dtype for e in compared})
    planned = sum((min(e.rows, args.sample_rows) if args.sample_rows else e.rows) * e.k for e in compared)
    results = []
    with Progress("parity", len(selected), planned, noun="tensors", enabled=not args.quiet) as progress:
        for entry in selected:
            results.append(_compare_tensor(entry, args, reference, ours, progress))
            progress.advance(items=1)

    activations = check_activations(recipe, args.reference, args.allow_unsupported_gpu, device, args.impl)
    status, code, reasons = outcome(results, args.allow_incomplete, activations)
    doc = {
        **_base_doc(args, block_size),
        "status": status,
        "exit_code": int(code),
        "complete": not reasons,
        "incomplete": reasons,
        "sampled": any(r.rows_selected < r.rows_total for r in results if not r.skipped),
        "layout": layout,
        "reference": reference.describe(),
        "ours": {**ours.describe(), "impls": sorted({r.impl for r in results if r.impl})},
        "totals": {**totals(results), "elapsed_s": round(time.perf_counter() - started, 3)},
        "notes": notes,
        "tensors": [r.to_json() for r in results],
        "activations": activations,
    }
    print(table(results, args.max_rows_shown))
    for note in notes:
        print(f"note: {note}")
    print(summary_line(doc))
    if args.json:
        _write_report(args.json, doc)
    return code


def record_error(args: argparse.Namespace, text: str) -> str:
    """A refused run, recorded where ``--json`` is writable as ``{"status": "error", "exit_code": 2,
    "error": ...}``; returns a note for the error line when the report cannot be written."""
    if not args.json or _json_problem(args.json):
        return ""
    try:
        write_json(args.json, {**_base_doc(args, None), "error": text})
    except OSError as exc:  # still one line: the error, and that the report is missing
        return f" (--json {args.json} not written: {exc.strerror or type(exc).__name__})"
    return ""
