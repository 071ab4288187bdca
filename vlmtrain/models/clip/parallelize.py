"""How CLIP is split across ranks: its tensor-parallel plan and its pipeline layers."""
from __future__ import annotations

from vlmtrain.models.clip.config import CLIPConfig
from vlmtrain.models.spec import TensorParallelPlan

# Every block of both towers: q/k/v and the MLP's up projection split by output features (each rank
# holds heads/tp heads and hidden/tp units), out and down projections by input features (their
# partial sums are all-reduced).
TP_PLAN = TensorParallelPlan(
    column=(r".*\.attn\.q_proj\.weight$", r".*\.attn\.k_proj\.weight$", r".*\.attn\.v_proj\.weight$",
            r".*\.mlp\.up_proj\.weight$"),
    row=(r".*\.attn\.out_proj\.weight$", r".*\.mlp\.down_proj\.weight$"),
)


def tp_divisible(cfg: CLIPConfig) -> dict[str, int]:
    """Each tensor-parallel rank holds whole attention heads."""
    return {"model.vision.heads": cfg.vision.heads, "model.text.heads": cfg.text.heads}


def pipeline_depth(cfg: CLIPConfig) -> int:
    """Transformer blocks of both towers, which a pipeline's stages share out."""
    return cfg.vision.layers + cfg.text.layers
