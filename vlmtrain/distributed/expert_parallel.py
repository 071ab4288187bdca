"""What our code needs from DeepSpeed's MoE beyond the model: the full experts of a run whose experts
are split over expert-parallel ranks, under the names a 1-rank model gives them."""
from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn

# DeepSpeed's name of a local expert's parameter: ...deepspeed_experts.<local index>.<rest>
EXPERT_KEY = re.compile(r"^(.*\.deepspeed_experts)\.(\d+)(\..*)$")


def expert_group(ep: int):
    """This rank's expert-parallel group, as DeepSpeed's engine created it."""
    from deepspeed.utils import groups

    return groups._get_expert_parallel_group(f"ep_size_{ep}")


@torch.no_grad()
def gather_experts(module: nn.Module, state: dict[str, torch.Tensor], ep_group) -> dict[str, torch.Tensor]:
    """Collective over the expert-parallel group: ``state`` (this rank's state dict) with every expert
    of every MoE layer, renamed from local to global index (ep rank · local experts + local index,
    the order of DeepSpeed's all-to-all)."""
    ep = dist.get_world_size(ep_group)
    full = {}
    for key, value in state.items():  # the same keys in the same order on every rank
        match = EXPERT_KEY.match(key)
        if not match:
            full[key] = value
            continue
        local = len(module.get_submodule(match[1]))
        parts = [torch.empty_like(value) for _ in range(ep)]
        dist.all_gather(parts, value.contiguous(), group=ep_group)
        for owner, part in enumerate(parts):
            full[f"{match[1]}.{owner * local + int(match[2])}{match[3]}"] = part
    return full
