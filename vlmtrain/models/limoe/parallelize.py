"""How LIMoE is split across ranks: its experts over the expert-parallel group (DeepSpeed's MoE
all-to-all); no tensor-parallel plan and no pipeline yet. (The export gathers the experts back:
``distributed/expert_parallel.py``.)"""
from __future__ import annotations

from vlmtrain.models.limoe.config import LIMoEConfig
from vlmtrain.models.limoe.model import LIMoE


def num_experts(cfg: LIMoEConfig) -> int:
    return cfg.moe.num_experts if cfg.moe_layers() else 0


def build_sharded(cfg: LIMoEConfig, ep_size: int, ep_rank: int) -> LIMoE:
    """The model with this expert-parallel rank's ``num_experts / ep_size`` experts per MoE block."""
    return LIMoE(cfg, ep_size=ep_size, ep_rank=ep_rank)
