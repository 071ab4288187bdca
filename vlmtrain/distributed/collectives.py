"""Collectives over one process group (the data-parallel group, usually), safe outside distributed runs."""
from __future__ import annotations

from typing import TypeVar

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed import ProcessGroup

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_size(group: ProcessGroup | None = None) -> tuple[int, int]:
    """This rank's index in ``group`` (default: all ranks) and the group's size; ``(0, 1)`` outside torch.distributed."""
    if is_distributed():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def gather_with_grad(features: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate ``features`` from every rank of ``group``, in group-rank order, keeping the graph.

    Functional collectives are torch's replacement for the deprecated ``torch.distributed.nn``
    gather; their backward reduce-scatters the gradients back to the owning ranks.
    """
    if rank_and_size(group)[1] == 1:
        return features
    return funcol.all_gather_single(features.contiguous(), 0, group or dist.group.WORLD)


def sum_over(values: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Elementwise sum over the ranks of ``group`` (one all-reduce for a whole vector of values)."""
    values = values.detach().float().clone()
    if rank_and_size(group)[1] > 1:
        dist.all_reduce(values, group=group)
    return values


def all_gather_objects(obj: T, group: ProcessGroup | None = None) -> list[T]:
    """``[obj of group rank 0, obj of group rank 1, ...]`` on every rank (pickled: for small objects)."""
    _, size = rank_and_size(group)
    if size == 1:
        return [obj]
    gathered: list = [None] * size
    dist.all_gather_object(gathered, obj, group=group)
    return gathered
