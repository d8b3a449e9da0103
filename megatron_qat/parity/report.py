"""What a parity run prints (table + summary on stdout) and writes (``--json``, schema in
docs/parity.md, ``"schema": "megatron-qat.parity/1"``)."""

from __future__ import annotations

import json
import math

from .compare import TensorResult

SCHEMA = "megatron-qat.parity/1"


def totals(results: list[TensorResult]) -> dict:
    compared = [r for r in results if not r.skipped]
    keys = ("elements_compared", "code_mismatches", "scale_mismatches", "value_mismatches", "dequant_mismatches", "nonfinite_values", "excluded_rows")
    out = {
        "tensors_selected": len(results),
        "tensors_compared": len(compared),
        "tensors_mismatched": sum(r.mismatched for r in compared),
        "tensors_skipped": len(results) - len(compared),
    }
    out.update({k: sum(getattr(r, k) for r in compared) for k in keys})
    worst = max((r.max_abs_diff for r in compared), default=0.0)
    out["max_abs_diff"] = worst if math.isfinite(worst) else repr(worst)
    return out


def _human(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def summary_line(doc: dict) -> str:
    t = doc["totals"]
    ref = doc["reference"]["name"]
    ours = doc["ours"]
    where = f"ours=megatron_qat.mxfp4[{','.join(ours['impls']) or '-'}] on {ours['device']}"
    if doc["status"] == "equal":
        head = "PARITY OK"
        body = f"codes, scale bytes and values bit-identical to {ref}"
    else:
        head = "PARITY MISMATCH"
        body = (
            f"{t['tensors_mismatched']} tensor(s) differ from {ref}: {t['code_mismatches']} codes, {t['scale_mismatches']} "
            f"scales, {t['value_mismatches']} values, {t['dequant_mismatches']} fp32 decodes; max |diff| {t['max_abs_diff']}"
        )
    extra = f"; {t['tensors_skipped']} skipped" if t["tensors_skipped"] else ""
    if t["nonfinite_values"]:
        extra += f"; {t['nonfinite_values']} non-finite values ({t['excluded_rows']} rows excluded)"
    return (
        f"{head}: {t['tensors_compared']} tensors, {_human(t['elements_compared'])} elements, {body} "
        f"(reference={ref}: {doc['reference']['reason']}; {where}){extra}"
    )


def table(results: list[TensorResult], max_rows: int) -> str:
    header = ("status", "tensor", "shape", "dtype", "elements", "codes!=", "scales!=", "values!=", "max|diff|")
    rows = []
    shown = sorted(results, key=lambda r: (r.status == "equal", r.skipped))[:max_rows]
    for r in shown:
        status = "SKIP" if r.skipped else ("OK" if r.status == "equal" else "DIFF")
        elems = _human(r.elements_compared) + ("" if r.rows_compared in (0, r.rows_total) else f" ({r.rows_compared}/{r.rows_total} rows)")
        rows.append(
            (status, r.name, "x".join(map(str, r.shape)), r.dtype, elems, str(r.code_mismatches), str(r.scale_mismatches), str(r.value_mismatches + r.dequant_mismatches), f"{r.max_abs_diff:g}")
            if not r.skipped
            else (status, r.name, "x".join(map(str, r.shape)), r.dtype, r.status, "", "", "", "")
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    widths[1] = min(widths[1], 72)
    fmt = lambda row: "  ".join(c[-widths[i]:].ljust(widths[i]) if i == 1 else c.ljust(widths[i]) for i, c in enumerate(row)).rstrip()  # noqa: E731
    lines = [fmt(header)] + [fmt(row) for row in rows]
    if len(results) > len(shown):
        lines.append(f"... {len(results) - len(shown)} more equal tensors (all in --json)")
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


def write_json(path: str, doc: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, allow_nan=False)
        f.write("\n")
