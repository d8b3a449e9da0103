"""One parity run: resolve sources and layouts, pick the reference, compare tensor by tensor, report.

Returns the exit code (:mod:`.errors`): 0 every selected tensor compared in full (or the
``--sample-rows`` sample) and identical; 1 any mismatch; 2 usage/environment error (raised as
:class:`ParityError`, one line on stderr, and a ``--json`` report with ``"status": "error"`` where
the path is writable); 3 identical where compared but incomplete (tensors skipped, rows excluded
as non-finite, a tensor with no finite row, nothing compared); ``--allow-incomplete`` turns 3 into
0 unless nothing at all was compared."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import tempfile
import time

import torch

from .compare import NOT_COMPARED, BatchInput, TensorResult, compare_batch
from .errors import EXIT_EQUAL, EXIT_ERROR, EXIT_INCOMPLETE, EXIT_MISMATCH, ParityError
from .progress import Progress
from .report import SCHEMA, summary_line, table, totals, write_json
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
    try:  # what write_json does: a temporary file in that directory (os.access says yes to root and on read-only mounts)
        fd, probe = tempfile.mkstemp(prefix=".parity-", suffix=".json.tmp", dir=parent)
    except OSError as exc:
        return f"--json {path}: directory {parent} is not writable ({exc.strerror or type(exc).__name__})"
    os.close(fd)
    os.unlink(probe)
    return None


def _write_report(path: str, doc: dict) -> None:
    """write_json, an OSError (disk full, directory removed meanwhile) as a one-line ParityError."""
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


def _select(entries: list[TensorEntry], pattern: str, paths: list[str]) -> list[TensorEntry]:
    shown = f"--include {shlex.quote(pattern)}"  # pasteable back into a shell, backslashes as typed
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ParityError(f"{shown}: not a valid regular expression ({exc})") from exc
    selected = [e for e in entries if regex.search(e.name)]
    if not selected:
        example = ", ".join(e.name for e in entries[:3])
        raise ParityError(
            f"no tensor name in {', '.join(paths)} matches {shown} ({len(entries)} tensors" + (f", e.g. {example})" if entries else ")")
        )
    return selected


def _compare_tensor(entry: TensorEntry, args, reference, ours, progress: Progress) -> TensorResult:
    result = TensorResult(
        entry.name, entry.file, list(entry.shape), entry.dtype_name, entry.numel, layout=entry.layout,
        blocked_shape=list(entry.blocked_shape), rows_total=entry.rows,
    )
    reason = entry.skip_reason or reference.unsupported(entry.dtype)
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


def outcome(results: list[TensorResult], allow_incomplete: bool) -> tuple[str, int, list[str]]:
    """(status, exit code, incomplete reasons) of a finished run."""
    reasons = incomplete_reasons(results)
    if any(r.mismatched for r in results):
        return "mismatch", EXIT_MISMATCH, reasons
    if not any(r.rows_compared for r in results):
        return "nothing compared", EXIT_INCOMPLETE, reasons  # never a pass, --allow-incomplete or not
    if reasons:
        return "incomplete", EXIT_EQUAL if allow_incomplete else EXIT_INCOMPLETE, reasons
    return "equal", EXIT_EQUAL, reasons


def _base_doc(args: argparse.Namespace) -> dict:
    from megatron_qat import __version__

    synthetic = args.synthetic or not args.paths
    return {
        "schema": SCHEMA,
        "tool_version": __version__,
        "status": "error",
        "exit_code": EXIT_ERROR,
        "sources": ["synthetic"] if synthetic else list(args.paths),
        "include": None if synthetic else args.include,
        "block_size": 32,
        "options": {
            "limit": args.limit, "sample_rows": args.sample_rows, "chunk_elements": args.chunk_elements,
            "layout": args.layout, "allow_incomplete": args.allow_incomplete,
        },
    }


def _run_export_check(args: argparse.Namespace) -> int:
    """``parity DST --source SRC``: :func:`megatron_qat.export.verify.verify_export` (the shipped
    bytes of an export decode to exactly ``fake_quantize(SRC)``; other tensors byte-identical)."""
    if len(args.paths) != 1 or args.synthetic:
        raise ParityError("--source SRC checks one MXFP4 export: give exactly one PATH (the export directory)")
    from ..export.codec import ExportError
    from ..export.verify import verify_export

    try:
        result = verify_export(args.paths[0], args.source, family=args.layout)
    except ExportError as exc:
        raise ParityError(str(exc)) from exc
    print(result.summary())
    if args.json:
        _write_report(args.json, {
            **_base_doc(args),
            "mode": "export",
            "source": args.source,
            "status": "equal" if result.ok else "mismatch",
            "exit_code": result.exit_code,
            "format": result.format,
            "expert_tensors": result.expert_tensors,
            "copied_tensors": result.copied_tensors,
            "mismatches": result.mismatches,
            "missing": result.missing,
            "extra": result.extra,
        })
    return EXIT_EQUAL if result.ok else EXIT_MISMATCH


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

    from .references import Ours, choose_reference

    reference = choose_reference(args.reference, args.allow_unsupported_gpu)
    ours = Ours(device, args.impl)
    ours.check({e.dtype for e in selected if not e.skip_reason and not reference.unsupported(e.dtype)})
    planned = sum(
        (min(e.rows, args.sample_rows) if args.sample_rows else e.rows) * e.k for e in selected if not e.skip_reason
    )
    progress = Progress(planned, len(selected), enabled=not args.quiet)
    results = []
    try:
        for entry in selected:
            results.append(_compare_tensor(entry, args, reference, ours, progress))
            progress.tensor_done(entry.name)
    finally:
        progress.close()

    status, code, reasons = outcome(results, args.allow_incomplete)
    doc = {
        **_base_doc(args),
        "status": status,
        "exit_code": code,
        "complete": not reasons,
        "incomplete": reasons,
        "sampled": any(r.rows_selected < r.rows_total for r in results if not r.skipped),
        "layout": layout,
        "reference": reference.describe(),
        "ours": {**ours.describe(), "impls": sorted({r.impl for r in results if r.impl})},
        "totals": {**totals(results), "elapsed_s": round(time.perf_counter() - started, 3)},
        "notes": notes,
        "tensors": [r.to_json() for r in results],
    }
    print(table(results, args.max_rows_shown))
    for note in notes:
        print(f"note: {note}")
    print(summary_line(doc))
    if args.json:
        _write_report(args.json, doc)
    return code


def main(argv: list[str] | None = None, prog: str = "megatron-qat parity") -> int:
    from .options import build_parser

    args = build_parser(prog).parse_args(argv)
    return run_and_report_errors(args)


def run_and_report_errors(args: argparse.Namespace) -> int:
    """:func:`run`, with a usage/environment error printed as one line on stderr (exit 2) and, when
    ``--json`` is writable, recorded there as ``{"status": "error", "exit_code": 2, "error": ...}``."""
    try:
        return run(args)
    except ParityError as exc:
        message = str(exc).replace("\n", " ")
        unwritten = ""
        if args.json and not _json_problem(args.json):
            try:
                write_json(args.json, {**_base_doc(args), "error": message})
            except OSError as write_exc:  # still one line: the error, and that the report is missing
                unwritten = f" (--json {args.json} not written: {write_exc.strerror or type(write_exc).__name__})"
        print(f"megatron-qat parity: error: {message}{unwritten}", file=sys.stderr)
        return EXIT_ERROR
