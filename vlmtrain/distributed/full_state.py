"""The full model's weights, whatever the layout trained it (ZeRO-3 partitions, tensor, pipeline or expert shards)."""
from __future__ import annotations

import torch

from vlmtrain.distributed.expert_parallel import expert_group, gather_experts
from vlmtrain.distributed.parallel_dims import ParallelDims
from vlmtrain.distributed.tensor_parallel import gather_tp_shards


def full_state_dict(engine, dims: ParallelDims) -> dict[str, torch.Tensor]:
    """Collective: the full model's state dict (fp32, CPU) on every rank, in the family's own key names."""
    import deepspeed

    if dims.pp > 1:
        from vlmtrain.distributed import pipeline

        return pipeline.full_state_dict(engine, dims)
    module = engine.module
    # ZeRO-3 first (each rank gets its tensor-parallel shard whole), then the tensor-parallel shards.
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        state = {**module.state_dict(), **(gather_tp_shards(module) if dims.tp > 1 else {})}
        if dims.ep > 1:  # every expert, under its 1-rank name
            state = gather_experts(module, state, expert_group(dims.ep))
        return {k: v.detach().float().cpu().clone() for k, v in state.items()}
