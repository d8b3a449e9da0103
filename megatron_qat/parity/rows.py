"""Which rows of a tensor are compared, and in which batches (bounded memory)."""

from __future__ import annotations


def sampled_rows(total: int, sample: int | None) -> list[int] | None:
    """``None`` (all rows) or the sorted row ids ``floor(i * total / sample)``, i = 0..sample-1:
    evenly spaced, deterministic, always including row 0."""
    if sample is None or sample >= total:
        return None
    return sorted({(i * total) // sample for i in range(sample)})


def plan_batches(total: int, matrix_rows: int, rows: list[int] | None, batch_rows: int) -> list[list[tuple[int, int]]]:
    """Split the selected rows into batches of at most ``batch_rows`` rows, each batch a list of
    contiguous ``(start, stop)`` ranges that never cross a multiple of ``matrix_rows``."""
    batch_rows = max(1, batch_rows)
    if rows is None:
        ranges = []
        for m0 in range(0, total, matrix_rows):
            m1 = min(total, m0 + matrix_rows)
            ranges.extend((s, min(m1, s + batch_rows)) for s in range(m0, m1, batch_rows))
    else:
        ranges = []
        for r in rows:
            if ranges and ranges[-1][1] == r and r % matrix_rows != 0 and r - ranges[-1][0] < batch_rows:
                ranges[-1] = (ranges[-1][0], r + 1)
            else:
                ranges.append((r, r + 1))
    batches: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    size = 0
    for start, stop in ranges:
        if current and size + (stop - start) > batch_rows:
            batches.append(current)
            current, size = [], 0
        current.append((start, stop))
        size += stop - start
    if current:
        batches.append(current)
    return batches
