"""How FLAVA is split across ranks: tensor parallelism only (no pipeline layers).

Every transformer block of the three encoders is split as CLIP's are (the plan's regexes match
any ``…attn.q_proj`` / ``…mlp.up_proj`` …): q/k/v and the MLP's up projection by output features
(each rank holds heads/tp heads and hidden/tp units), out and down projections by input features
(their partial sums all-reduced). The projections between encoders and the heads stay replicated.
A pipeline is not offered: the two views and the fusion of both encoders' outputs make the model a
graph, not a chain of layers; ``pipeline_layers=None`` makes vlm-train refuse ``parallel.pp>1``.
"""
from __future__ import annotations

from vlmtrain.models.clip.parallelize import TP_PLAN
from vlmtrain.models.flava.config import FLAVAConfig

__all__ = ["TP_PLAN", "tp_divisible"]


def tp_divisible(cfg: FLAVAConfig) -> dict[str, int]:
    """Each tensor-parallel rank holds whole attention heads of every encoder."""
    return {"model.vision.heads": cfg.vision.heads, "model.text.heads": cfg.text.heads,
            "model.fusion.heads": cfg.fusion.heads}
