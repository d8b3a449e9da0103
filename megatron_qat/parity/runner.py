"""One parity run: resolve sources, pick the reference, compare tensor by tensor, report.

Returns the exit code: 0 all compared tensors equal, 1 any mismatch, 2 usage/environment
error (raised as :class:`ParityError` and printed by :func:`main`)."""

from __future__ import annotations

import argparse
import re
import sys
import time

import torch

from .compare import BatchInput, TensorResult, compare_batch
from .errors import EXIT_EQUAL, EXIT_ERROR, EXIT_MISMATCH, ParityError
from .progress import Progress
from .report import SCHEMA, summary_line, table, totals, write_json
from .rows import plan_batches, sampled_rows
from .sources import TensorEntry, iter_entries, resolve, synthetic_entries


def _check_args(args: argparse.Namespace) -> None:
    for flag in ("limit", "sample_rows", "chunk_elements"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ParityError(f"--{flag.replace('_', '-')}={value}: must be a positive integer")
    if args.synthetic and args.paths:
        raise ParityError("--synthetic checks the built-in tensors and takes no PATH")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ParityError("--device cuda: no CUDA GPU is visible (use --device cpu)")


def _select(entries: list[TensorEntry], pattern: str, paths: list[str]) -> list[TensorEntry]:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ParityError(f"--include {pattern!r}: not a valid regular expression ({exc})") from exc
    selected = [e for e in entries if regex.search(e.name)]
    if not selected:
        example = ", ".join(repr(e.name) for e in entries[:3])
        raise ParityError(
            f"no tensor name in {', '.join(paths)} matches --include {pattern!r} ({len(entries)} tensors"
            + (f", e.g. {example})" if entries else ")")
        )
    return selected


def _compare_tensor(entry: TensorEntry, args, reference, ours, progress: Progress) -> TensorResult:
    result = TensorResult(entry.name, entry.file, list(entry.shape), entry.dtype_name, entry.numel, rows_total=entry.rows)
    reason = entry.skip_reason or reference.unsupported(entry.dtype)
    if reason:
        result.status = reason
        return result
    start = time.perf_counter()
    k = entry.shape[-1]
    result.impl = ours.resolved_impl(torch.zeros(1, k, dtype=entry.dtype))
    rows = sampled_rows(entry.rows, args.sample_rows)
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
            compare_batch(result, BatchInput(x.contiguous(), ids, entry.shape), reference.quantize(x), ours.run(x), not reference.decodes_negative_zero)
        progress.advance(sum(b - a for a, b in batch) * k)
    result.elapsed_s = round(time.perf_counter() - start, 4)
    result.finish()
    return result


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    _check_args(args)
    synthetic = args.synthetic or not args.paths
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    notes: list[str] = []
    if synthetic:
        selected = synthetic_entries()
    else:
        entries = list(iter_entries(resolve(args.paths), args.trust_pickle, notes))
        selected = _select(entries, args.include, args.paths)
    if args.limit is not None:
        selected = selected[: args.limit]

    from .references import Ours, choose_reference

    reference = choose_reference(args.reference, args.allow_unsupported_gpu)
    ours = Ours(device, args.impl)
    planned = sum(
        (min(e.rows, args.sample_rows) if args.sample_rows else e.rows) * e.shape[-1] for e in selected if not e.skip_reason
    )
    progress = Progress(planned, len(selected), enabled=not args.quiet)
    results = []
    try:
        for entry in selected:
            results.append(_compare_tensor(entry, args, reference, ours, progress))
            progress.tensor_done(entry.name)
    finally:
        progress.close()

    compared = [r for r in results if not r.skipped]
    mismatched = any(r.mismatched for r in compared)
    status = "mismatch" if mismatched else ("equal" if compared else "nothing compared")
    code = EXIT_MISMATCH if mismatched else (EXIT_EQUAL if compared else EXIT_ERROR)
    from megatron_qat import __version__

    doc = {
        "schema": SCHEMA,
        "tool_version": __version__,
        "status": status,
        "exit_code": code,
        "sources": ["synthetic"] if synthetic else list(args.paths),
        "include": None if synthetic else args.include,
        "block_size": 32,
        "options": {"limit": args.limit, "sample_rows": args.sample_rows, "chunk_elements": args.chunk_elements},
        "reference": reference.describe(),
        "ours": {**ours.describe(), "impls": sorted({r.impl for r in compared if r.impl})},
        "totals": {**totals(results), "elapsed_s": round(time.perf_counter() - started, 3)},
        "notes": notes,
        "tensors": [r.to_json() for r in results],
    }
    print(table(results, args.max_rows_shown))
    for note in notes:
        print(f"note: {note}")
    print(summary_line(doc) if compared else f"PARITY NOT RUN: all {len(results)} selected tensors were skipped (see the table)")
    if args.json:
        write_json(args.json, doc)
    return code


def main(argv: list[str] | None = None, prog: str = "megatron-qat parity") -> int:
    from .options import build_parser

    args = build_parser(prog).parse_args(argv)
    return run_and_report_errors(args)


def run_and_report_errors(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except ParityError as exc:
        print(f"megatron-qat parity: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
