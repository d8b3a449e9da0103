"""Where one logging step's values go: Megatron's writers, the INFO summary, the NaN warnings.

Tags are ``megatron_qat/<label>/<metric>`` (``label`` = ``layer_<L>/fc1``), the TensorBoard step is
the iteration count Megatron itself logs at (iterations completed once this step is done).
"""

from __future__ import annotations

import logging

from .megatron_env import megatron_writers

log = logging.getLogger("megatron_qat.metrics")
TAG_PREFIX = "megatron_qat"


def tag(label: str, metric: str) -> str:
    return f"{TAG_PREFIX}/{label}/{metric}"


def write_to_megatron(values: dict[str, float], step: int) -> int:
    """Write ``values`` to Megatron's TensorBoard and W&B writers, those that exist on this rank
    (Megatron creates them on the last rank only). Returns how many writers were written to."""
    tensorboard, wandb = megatron_writers()
    written = 0
    if tensorboard is not None:
        for name, value in values.items():
            tensorboard.add_scalar(name, value, step)
        written += 1
    if wandb is not None:
        wandb.log(dict(values), step)
        written += 1
    return written


def _is_global_rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def log_summary(raw: dict[str, dict], values: dict[str, float], step: int) -> None:
    """One INFO line (global rank 0): module count, worst relative RMSE, flushed and non-finite blocks."""
    if not raw or not _is_global_rank_zero():
        return
    worst = max(raw, key=lambda label: values[tag(label, "rel_rmse")])
    flushed = sum(r["flushed_blocks"] for r in raw.values())
    flushed_nonzero = sum(r["flushed_nonzero_blocks"] for r in raw.values())
    nonfinite = sum(r["nonfinite_blocks"] for r in raw.values())
    log.info(
        "megatron_qat MXFP4 step %d: %d expert modules, worst rel_rmse %.4g (%s), flushed blocks %d "
        "(%d not all zero), non-finite blocks %d",
        step,
        len(raw),
        values[tag(worst, "rel_rmse")],
        worst,
        flushed,
        flushed_nonzero,
        nonfinite,
    )


def warn_nonfinite(label: str, expert: int, blocks: int, block_size: int, step: int) -> None:
    log.warning(
        "megatron_qat: master weight of %s expert %d holds NaN/Inf in %d block(s) of %d elements at step %d "
        "(its fake-quantized blocks are NaN); first occurrence for this expert, not repeated",
        label,
        expert,
        blocks,
        block_size,
        step,
    )
