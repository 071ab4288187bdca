"""The layout of a run's ranks: data × pipeline × tensor (× expert) parallel degrees, validated once.

Rank order (the one DeepSpeed's ``PipeModelDataParallelTopology`` and its AutoTP mesh use too):
tensor-parallel peers are consecutive ranks, so with ``tp`` dividing the GPUs of a node they share a
node and its fast links; then data-parallel replicas; pipeline stages are outermost::

    rank = (stage * dp + dp_rank) * tp + tp_rank
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch.distributed as dist
from torch.distributed import ProcessGroup

from vlmtrain.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    world: int
    tp: int = 1
    pp: int = 1
    ep: int = 1  # expert parallelism: groups of ep consecutive data-parallel ranks share out the experts

    def __post_init__(self) -> None:
        for key, value in (("parallel.tp", self.tp), ("parallel.pp", self.pp), ("parallel.ep", self.ep)):
            if value < 1:
                raise ConfigError(f"{key}={value}: must be >= 1")
        if self.world % (self.tp * self.pp):
            raise ConfigError(f"{self.world} rank(s) cannot be split into parallel.tp={self.tp} × "
                              f"parallel.pp={self.pp} groups: the world size must be a multiple of tp·pp="
                              f"{self.tp * self.pp} (change parallel.tp/parallel.pp or the number of ranks)")
        if self.ep > 1 and self.dp % self.ep:
            raise ConfigError(f"parallel.ep={self.ep} does not divide the data-parallel size dp={self.dp}: "
                              f"expert groups are made of data-parallel ranks; pick an ep that divides {self.dp} "
                              f"or change the number of ranks")

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """``(stage, dp_rank, tp_rank)`` of a global rank."""
        tp_rank = rank % self.tp
        dp_rank = rank // self.tp % self.dp
        return rank // (self.tp * self.dp), dp_rank, tp_rank

    def rank_of(self, stage: int, dp_rank: int, tp_rank: int) -> int:
        return (stage * self.dp + dp_rank) * self.tp + tp_rank

    def dp_rank(self, rank: int) -> int:
        return self.coordinates(rank)[1]

    def ep_rank(self, rank: int) -> int:
        """This rank's place in its expert group (DeepSpeed's: consecutive data-parallel ranks)."""
        return self.dp_rank(rank) % self.ep

    def dp_groups(self) -> list[list[int]]:
        """Ranks that hold the same model shard and different data: gradients and contrastive gathers."""
        return [[self.rank_of(s, d, t) for d in range(self.dp)] for s in range(self.pp) for t in range(self.tp)]

    def tp_groups(self) -> list[list[int]]:
        return [[self.rank_of(s, d, t) for t in range(self.tp)] for s in range(self.pp) for d in range(self.dp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank_of(s, d, t) for s in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def describe(self) -> str:
        return f"dp={self.dp} × tp={self.tp} × pp={self.pp}" + (f" (ep={self.ep})" if self.ep > 1 else "")


@dataclass
class ProcessGroups:
    """This rank's groups, built once (collectively) and handed to whoever needs them."""
    dims: ParallelDims
    rank: int
    dp: ProcessGroup | None  # None: the default group (everyone is a data-parallel peer)

    @cached_property
    def dp_rank(self) -> int:
        return self.dims.dp_rank(self.rank)

    @property
    def is_dp_leader(self) -> bool:
        """The first rank of this rank's data replica (tp rank 0, stage 0): it speaks for the replica."""
        stage, _, tp_rank = self.dims.coordinates(self.rank)
        return stage == 0 and tp_rank == 0


def build_process_groups(dims: ParallelDims, rank: int) -> ProcessGroups:
    """Collective: every rank creates every data-parallel group (torch requires it), keeps its own."""
    if dims.dp == dims.world:
        return ProcessGroups(dims, rank, None)
    mine = None
    for ranks in dims.dp_groups():
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return ProcessGroups(dims, rank, mine)
