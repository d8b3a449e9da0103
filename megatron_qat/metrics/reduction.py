"""Reduce the per-rank statistics of one logging step to global values, and turn them into scalars.

Group: when ``torch.distributed`` and megatron-core's ``parallel_state`` are initialised, the
expert-tensor x expert-model x pipeline group (``get_expert_tensor_model_pipeline_parallel_group``):
the ranks that together hold exactly one copy of every expert shard of every layer (expert data
parallel replicas are identical and stay out). Otherwise nothing is reduced (each rank reports its
own experts).

Collectives (logging steps only, on every rank of the group, in this order): one
``all_gather_object`` of the label lists (stages hold different layers), one ``all_reduce(SUM)`` of
an int64 ``[n_labels, 7 + 256]`` tensor and one of a float64 ``[n_labels, 2]`` tensor; then the
single host copy of the step. The statistics are sums, and min / median / max of the scale bytes
come from the summed 256-bin histogram, so the reduced values are exact.
"""

from __future__ import annotations

import math

import torch

from .block_stats import COUNT_FIELDS, SCALE_BINS, LocalStats

METRICS = (
    "rel_rmse",
    "flushed_block_frac",
    "flushed_nonzero_blocks",
    "e2m1_max_frac",
    "tie_frac",
    "nonfinite_blocks",
    "scale_byte_min",
    "scale_byte_median",
    "scale_byte_max",
)


def _parallel_state():
    try:
        from megatron.core import parallel_state
    except ImportError as e:
        if e.name in ("megatron", "megatron.core"):
            return None
        raise
    return parallel_state


def reduction_group():
    """The process group to reduce over, or ``None`` (not distributed / no Megatron parallel state)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    ps = _parallel_state()
    if ps is None or not ps.model_parallel_is_initialized():
        return None
    return ps.get_expert_tensor_model_pipeline_parallel_group()


def pipeline_rank_and_size() -> tuple[int, int]:
    import torch.distributed as dist

    ps = _parallel_state()
    if ps is None or not (dist.is_available() and dist.is_initialized()) or not ps.model_parallel_is_initialized():
        return 0, 1
    return ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()


def _device_for(group, pending) -> torch.device:
    if pending:
        return next(iter(pending.values())).sums.device
    import torch.distributed as dist

    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce(pending: dict[str, LocalStats], group=None) -> dict[str, dict]:
    """Global raw sums per label: ``{label: {"sq_err", "sq_master", <COUNT_FIELDS>, "hist": list}}``.

    The one host synchronisation of a logging step happens here."""
    import torch.distributed as dist

    labels = sorted(pending)
    if group is not None and dist.get_world_size(group) > 1:
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, labels, group=group)
        labels = sorted(set().union(*gathered))
    device = _device_for(group, pending)
    n = len(labels)
    ints = torch.zeros((n, len(COUNT_FIELDS) + SCALE_BINS), dtype=torch.int64, device=device)
    floats = torch.zeros((n, 2), dtype=torch.float64, device=device)
    for row, label in enumerate(labels):
        stats = pending.get(label)
        if stats is not None:
            ints[row, : len(COUNT_FIELDS)] = stats.counts
            ints[row, len(COUNT_FIELDS) :] = stats.scale_hist
            floats[row] = stats.sums
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(ints, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(floats, op=dist.ReduceOp.SUM, group=group)
    ints_h, floats_h = ints.tolist(), floats.tolist()
    out = {}
    for label, row_i, row_f in zip(labels, ints_h, floats_h):
        raw = dict(zip(COUNT_FIELDS, row_i[: len(COUNT_FIELDS)]))
        raw["hist"] = row_i[len(COUNT_FIELDS) :]
        raw["sq_err"], raw["sq_master"] = row_f
        out[label] = raw
    return out


def _hist_quantiles(hist: list[int]) -> tuple[int, int, int] | None:
    """(min, lower median, max) scale byte of a histogram, ``None`` when it is empty."""
    total = sum(hist)
    if total == 0:
        return None
    nonzero = [b for b, c in enumerate(hist) if c]
    target = (total - 1) // 2  # lower median: the element at index (n-1)//2 of the sorted bytes
    seen = 0
    for b, c in enumerate(hist):
        seen += c
        if seen > target:
            return nonzero[0], b, nonzero[-1]
    raise AssertionError("unreachable: histogram total changed while reading it")


def scalars(raw: dict) -> dict[str, float]:
    """The published metrics of one label from its reduced raw sums (see docs/metrics.md)."""
    finite_blocks = raw["finite_blocks"]
    elements = raw["finite_elements"]
    if raw["sq_master"] > 0:
        rel_rmse = math.sqrt(raw["sq_err"] / raw["sq_master"])
    else:
        rel_rmse = 0.0 if raw["sq_err"] == 0 else math.inf
    out = {
        "rel_rmse": rel_rmse,
        "flushed_block_frac": raw["flushed_blocks"] / finite_blocks if finite_blocks else 0.0,
        "flushed_nonzero_blocks": float(raw["flushed_nonzero_blocks"]),
        "e2m1_max_frac": raw["at_max"] / elements if elements else 0.0,
        "tie_frac": raw["ties"] / elements if elements else 0.0,
        "nonfinite_blocks": float(raw["nonfinite_blocks"]),
    }
    q = _hist_quantiles(raw["hist"])
    if q is not None:
        out["scale_byte_min"], out["scale_byte_median"], out["scale_byte_max"] = (float(v) for v in q)
    return out
