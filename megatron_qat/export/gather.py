"""Quantize-then-gather: assemble one module's MXFP4 bytes over the expert-TP and EP groups.

Megatron's expert grid (megatron-core ``parallel_state``; docs/export.md): for a fixed pipeline
stage and expert-data-parallel replica, ranks form an ``ETP x EP`` grid. An EP group fixes the ETP
coordinate, an ETP group fixes the EP coordinate. Local shapes of a ``TEGroupedMLP`` with
``N = num_experts / EP`` local experts (te-megatron-internals.md §6):

- ``linear_fc1`` column-parallel: ``[2I/ETP, H]`` per expert with GLU, holding
  ``[gate_shard; up_shard]`` (``[I/ETP, H]`` without GLU);
- ``linear_fc2`` row-parallel along K: ``[H, I/ETP]`` per expert.

MXFP4 blocks run along K (in_features). fc1's K is whole on every rank, so its codes
``[N, R, H/2]`` and scales ``[N, R, H/32]`` concatenate along the row dim (dim 1), after the GLU
re-split (gate shards first, then up shards). fc2's K is split: codes concatenate along K/2 and
scales along K/32 (the last dim), which equals quantizing the gathered weight only when each
shard holds whole blocks, i.e. ``(I/ETP) % 32 == 0`` (checked by the caller). EP shards
concatenate along the expert dim (dim 0) in EP-rank order, so position = global expert id
(``ep_rank * N + local index``, as Megatron numbers them).

Every tensor is moved with ``all_gather`` (``dst=None``: every rank of the grid ends up with the
full layer) or with ``gather`` to one destination rank (other ranks get ``None``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .codec import ExportError


@dataclass(frozen=True)
class ExpertGroups:
    """The expert-TP and EP process groups of one expert grid (``None`` = a group of size 1)."""

    etp: object | None = None
    ep: object | None = None


def _dist():
    import torch.distributed as dist

    return dist


def group_size(group) -> int:
    if group is None:
        return 1
    return _dist().get_world_size(group)


def group_rank(group) -> int:
    if group is None:
        return 0
    return _dist().get_rank(group)


def groups_from_parallel_state() -> ExpertGroups:
    """Megatron's expert-TP and EP groups (``parallel_state`` must be initialised)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise ExportError(
            "megatron parallel_state is not initialised: pass groups=ExpertGroups(etp=..., ep=...) "
            "or initialise model parallelism before exporting"
        )
    return ExpertGroups(etp=ps.get_expert_tensor_parallel_group(), ep=ps.get_expert_model_parallel_group())


@dataclass(frozen=True)
class Destination:
    """Where the gathered tensors land: ``None`` coordinates = every rank (all_gather); otherwise
    the ETP and EP coordinates of the destination rank inside this rank's expert grid."""

    etp_index: int | None = None
    ep_index: int | None = None

    @property
    def everywhere(self) -> bool:
        return self.etp_index is None


def locate(dst: int | None, groups: ExpertGroups) -> Destination:
    """Find ``dst`` (a global rank) in this rank's ``ETP x EP`` grid, with two tiny all_reduces.

    Ranks in dst's ETP group know dst's ETP coordinate, ranks in its EP group its EP coordinate;
    an all_reduce(MAX) over the EP group, then over the ETP group, gives both to every rank of
    the grid (each EP group meets dst's ETP group in exactly one rank, and vice versa). A ``dst``
    outside the grid is refused on every rank of the grid alike (ExportError)."""
    if dst is None:
        return Destination()
    if group_size(groups.etp) == 1 and group_size(groups.ep) == 1:
        me = _dist().get_rank() if _dist().is_initialized() else 0
        if dst != me:
            raise ExportError(f"dst={dst} is not in this rank's expert grid (rank {me}, expert-TP = EP = 1)")
        return Destination(0, 0)
    dist = _dist()
    coords = torch.tensor([_index_in(dst, groups.etp), _index_in(dst, groups.ep)], dtype=torch.int64)
    for group in (groups.ep, groups.etp):
        if group is not None:
            dist.all_reduce(coords, op=dist.ReduceOp.MAX, group=group)
    etp_index, ep_index = (int(v) for v in coords)
    if etp_index < 0 or ep_index < 0:
        raise ExportError(
            f"dst={dst} is not a rank of this rank's expert grid (expert-TP x EP of one pipeline stage and "
            "expert-data-parallel replica); pass a rank of the grid, e.g. grid_root(groups), or dst=None"
        )
    return Destination(etp_index, ep_index)


def _index_in(rank: int, group) -> int:
    if group is None:
        me = _dist().get_rank() if _dist().is_initialized() else 0
        return 0 if rank == me else -1
    ranks = _dist().get_process_group_ranks(group)
    return ranks.index(rank) if rank in ranks else -1


def grid_root(groups: ExpertGroups) -> int:
    """The global rank at ETP index 0 and EP index 0 of this rank's grid (collective over the grid)."""
    dist = _dist()
    root = torch.tensor([-1], dtype=torch.int64)
    if group_rank(groups.ep) == 0:  # my ETP group holds the grid's (0, 0) rank at ETP index 0
        root[0] = dist.get_process_group_ranks(groups.etp)[0] if groups.etp is not None else dist.get_rank()
    if groups.ep is not None:
        dist.all_reduce(root, op=dist.ReduceOp.MAX, group=groups.ep)
    return int(root[0])


def _gather(t: torch.Tensor, group, root_index: int | None) -> list[torch.Tensor] | None:
    """Shards of ``t`` from every member of ``group``, in group-rank order; ``None`` on ranks that
    are not the root of a rooted gather."""
    if group_size(group) == 1:
        return [t]
    dist = _dist()
    t = t.contiguous()
    n = group_size(group)
    if root_index is None:
        out = [torch.empty_like(t) for _ in range(n)]
        dist.all_gather(out, t, group=group)
        return out
    is_root = group_rank(group) == root_index
    out = [torch.empty_like(t) for _ in range(n)] if is_root else None
    dist.gather(t, out, dst=dist.get_global_rank(group, root_index), group=group)
    return out


def merge_column(shards: list[torch.Tensor], glu: bool) -> torch.Tensor:
    """Column-parallel shards ``[N, R/ETP, ...]`` -> ``[N, R, ...]`` along dim 1. With GLU each
    shard is ``[gate_shard; up_shard]``: gate halves first (in ETP order), then up halves."""
    if not glu:
        return torch.cat(shards, dim=1)
    halves = [s.chunk(2, dim=1) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=1)


def merge_row(shards: list[torch.Tensor]) -> torch.Tensor:
    """Row-parallel shards ``[N, H, K/ETP (/2 or /32)]`` -> along the last (K) dim."""
    return torch.cat(shards, dim=-1)


def gather_experts(t: torch.Tensor, kind: str, groups: ExpertGroups, where: Destination, *, glu: bool = False):
    """One local tensor ``[N, ...]`` of a module -> the full-layer tensor ``[E, ...]`` (or None).

    ``kind``: ``"column"`` (fc1 codes/scales/bias: ETP along dim 1, GLU re-split), ``"row"``
    (fc2 codes/scales: ETP along the last dim) or ``"replicated"`` (fc2 bias: identical on every
    ETP rank, no ETP gather). Then EP along dim 0."""
    if kind == "replicated":
        full_local = t if (where.everywhere or group_rank(groups.etp) == where.etp_index) else None
    else:
        shards = _gather(t, groups.etp, where.etp_index)
        if shards is None:
            full_local = None
        elif kind == "column":
            full_local = merge_column(shards, glu)
        elif kind == "row":
            full_local = merge_row(shards)
        else:
            raise ValueError(f"gather_experts: unknown kind {kind!r} (column, row, replicated)")
    if full_local is None:
        return None
    experts = _gather(full_local, groups.ep, where.ep_index)
    return None if experts is None else torch.cat(experts, dim=0)
