"""What a parity run prints (table + summary on stdout) and writes (``--json``, schema in
docs/parity.md, ``"schema": "megatron-qat.parity/3"``).

The summary line's head says what the exit code means: ``PARITY OK`` (0; ``PARITY OK (SAMPLED)``
when ``--sample-rows`` chose a subset), ``PARITY MISMATCH`` (1), ``PARITY INCOMPLETE`` (3, or 0
with ``--allow-incomplete``, then ``PARITY OK (INCOMPLETE, ...)``), ``PARITY NOT RUN (INCOMPLETE)``
when nothing was compared (3)."""

from __future__ import annotations

import math

from ..tools.progress import count
from .compare import NOT_COMPARED, TensorResult

SCHEMA = "megatron-qat.parity/3"


def totals(results: list[TensorResult]) -> dict:
    compared = [r for r in results if not r.skipped]
    keys = ("rows_total", "rows_selected", "rows_compared", "elements_compared", "code_mismatches", "scale_mismatches", "value_mismatches", "dequant_mismatches", "nonfinite_values", "excluded_rows")
    out = {
        "tensors_selected": len(results),
        "tensors_compared": len(compared),
        "tensors_mismatched": sum(r.mismatched for r in compared),
        "tensors_skipped": len(results) - len(compared),
        "tensors_not_compared": sum(r.status == NOT_COMPARED for r in results),
        "tensors_incomplete": sum(not r.complete for r in results),
    }
    out.update({k: sum(getattr(r, k) for r in compared) for k in keys})
    worst = max((r.max_abs_diff for r in compared), default=0.0)
    out["max_abs_diff"] = worst if math.isfinite(worst) else repr(worst)
    return out


def summary_line(doc: dict) -> str:
    t = doc["totals"]
    ref = doc["reference"]["name"]
    ours = doc["ours"]
    where = f"ours=megatron_qat.mxfp4[{','.join(ours['impls']) or '-'}] on {ours['device']}"
    status, reasons = doc["status"], "; ".join(doc["incomplete"])
    sampled = f"; sampled {t['rows_selected']} of {t['rows_total']} rows (--sample-rows)" if doc["sampled"] else ""
    act = doc.get("activations")
    activations = "" if act is None else f"; activation rule {act['rule']}: {act['status']}" + (
        f" ({act['code_mismatches']} codes, {act['scale_mismatches']} scales, {act['value_mismatches']} values differ)"
        if act["status"] == "mismatch" else "")
    if status == "nothing compared":
        return f"PARITY NOT RUN (INCOMPLETE): nothing compared of {t['tensors_selected']} selected tensors: {reasons} (see the table)"
    if status == "mismatch":
        head = "PARITY MISMATCH"
        body = (
            f"{t['tensors_mismatched']} tensor(s) differ from {ref} under rule {doc['rule']}: {t['code_mismatches']} codes, {t['scale_mismatches']} "
            f"scales, {t['value_mismatches']} values, {t['dequant_mismatches']} fp32 decodes; max |diff| {t['max_abs_diff']}"
        )
    else:
        body = f"codes, scale bytes and values bit-identical to {ref} under rule {doc['rule']}"
        if status == "incomplete":
            head = "PARITY OK (INCOMPLETE, allowed by --allow-incomplete)" if doc["exit_code"] == 0 else "PARITY INCOMPLETE"
        else:
            head = "PARITY OK (SAMPLED)" if doc["sampled"] else "PARITY OK"
    extra = f"; INCOMPLETE: {reasons}" if reasons else ""
    return (
        f"{head}: {t['tensors_compared'] - t['tensors_not_compared']} tensors, {count(t['elements_compared'])} elements, {body} "
        f"(reference={ref}: {doc['reference']['reason']}; {where}){activations}{sampled}{extra}"
    )


def table(results: list[TensorResult], max_rows: int) -> str:
    header = ("status", "tensor", "shape", "dtype", "blocked", "elements", "codes!=", "scales!=", "values!=", "max|diff|")
    rows = []
    shown = sorted(results, key=lambda r: (r.status == "equal" and r.complete, r.skipped))[:max_rows]
    for r in shown:
        status = "SKIP" if r.skipped else ("DIFF" if r.mismatched else ("NONE" if r.status == NOT_COMPARED else ("OK" if r.complete else "PART")))
        elems = count(r.elements_compared) + ("" if r.rows_compared == r.rows_total else f" ({r.rows_compared}/{r.rows_total} rows)")
        cells = (status, r.name, "x".join(map(str, r.shape)), r.dtype, _blocked(r))
        rows.append(
            (*cells, elems, str(r.code_mismatches), str(r.scale_mismatches), str(r.value_mismatches + r.dequant_mismatches), f"{r.max_abs_diff:g}")
            if not r.skipped and r.status != NOT_COMPARED
            else (*cells, r.status, "", "", "", "")
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    widths[1] = min(widths[1], 72)
    fmt = lambda row: "  ".join(c[-widths[i]:].ljust(widths[i]) if i == 1 else c.ljust(widths[i]) for i, c in enumerate(row)).rstrip()  # noqa: E731
    lines = [fmt(header)] + [fmt(row) for row in rows]
    if len(results) > len(shown):
        lines.append(f"... {len(results) - len(shown)} more equal tensors (all in --json)")
    lines.append("blocked: the stored dim the MXFP4 blocks run along (in_features), family:role from the layout table")
    for r in results:
        if r.first_mismatch:
            m = r.first_mismatch
            lines.append(
                f"first mismatch in {r.name} at index {m['index']} (row {m['row']}, col {m['col']}, block {m['block']}; "
                f"differs in {'/'.join(m['differs_in'])}): input {m['input']} ({m['input_bits']}), code ours 0x{m['ours_code']:x} "
                f"vs ref 0x{m['ref_code']:x}, scale ours {m['ours_scale']} vs ref {m['ref_scale']}, value ours {m['ours_value']} vs ref {m['ref_value']}"
            )
        if r.nonfinite_values:
            lines.append(f"{r.name}: {r.nonfinite_values} non-finite value(s); {r.excluded_rows} row(s) holding them were excluded")
    return "\n".join(lines)


def _blocked(r: TensorResult) -> str:
    lay = r.layout or {}
    what = ":".join(v for v in (lay.get("family"), lay.get("role")) if v) or lay.get("rule", "")
    return f"dim{lay.get('blocked_dim')} {what}".strip()
