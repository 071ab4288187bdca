"""What our code needs from DeepSpeed AutoTP beyond the config: its groups checked against ours, and
the full weights of the layers it sharded.

``deepspeed.initialize`` does the sharding itself, from the ``tensor_parallel`` config section: it
builds a (dp, tp) device mesh (tp peers consecutive, as in ``ParallelDims``), replaces each planned
``nn.Linear`` by a ``LinearLayer`` (column) or ``LinearAllreduce`` (row) that keeps the same
``Parameter`` objects with their data narrowed to this rank's shard, so the optimizer we built
beforehand and the state-dict key names stay valid.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from vlmtrain.distributed.parallel_dims import ParallelDims


def check_deepspeed_groups(engine, dims: ParallelDims, rank: int) -> None:
    """DeepSpeed's tensor-parallel group, and the group it averages gradients (and partitions ZeRO
    state) over, must be ours: otherwise the loss, gathered over our data-parallel group, and the
    gradients would disagree about which ranks are replicas."""
    from deepspeed.utils import groups

    tp_ranks = dist.get_process_group_ranks(groups.get_tensor_model_parallel_group())
    dp_ranks = dist.get_process_group_ranks(engine.seq_data_parallel_group)
    ours_tp = next(g for g in dims.tp_groups() if rank in g)
    ours_dp = next(g for g in dims.dp_groups() if rank in g)
    if tp_ranks != ours_tp or dp_ranks != ours_dp:
        raise RuntimeError(f"rank {rank}: DeepSpeed's tensor/data-parallel groups {tp_ranks}/{dp_ranks} are "
                           f"not ours {ours_tp}/{ours_dp} ({dims.describe()})")


@torch.no_grad()
def gather_tp_shards(module: nn.Module) -> dict[str, torch.Tensor]:
    """Collective over each tensor-parallel group: the full tensors of the parameters AutoTP sharded,
    by state-dict key (replicated ones, e.g. a row-parallel bias, come back as they are).

    Each layer's own ``gather_params`` knows its split (dimension, uneven sizes). It is handed detached
    aliases, so it rebinds those and the live parameters are left alone; DeepSpeed's
    ``GatherReplacedLayerParams`` gathers the live parameters in place and re-splits them into fresh
    storage on exit (ZeRO 1/2 keep parameters as views of a flat buffer, and only re-point them at
    their next step).
    """
    from deepspeed.module_inject.layers import TensorParallel_Layer

    full = {}
    for prefix, layer in module.named_modules():
        if not isinstance(layer, TensorParallel_Layer):
            continue
        names, params = zip(*layer.named_parameters(recurse=False))
        aliases = [param.detach() for param in params]
        layer.gather_params(aliases)
        full.update({f"{prefix}.{name}": alias for name, alias in zip(names, aliases)})
    return full
