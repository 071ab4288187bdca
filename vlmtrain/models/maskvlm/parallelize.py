"""How MaskVLM is split across ranks: its tensor-parallel plan. (No pipeline: its four passes through
the encoders and the decoders' cross-attention to the other modality do not form one chain of layers.)"""
from __future__ import annotations

from vlmtrain.models.maskvlm.config import MaskVLMConfig
from vlmtrain.models.spec import TensorParallelPlan

# Every attention of the encoders (``attn``) and of the decoders (``self_attn``, ``cross_attn``): q/k/v
# split by output features (each rank holds heads/tp heads; a cross-attention's k/v read the other
# modality's width, split the same way), out by input features; MLPs up by output, down by input.
# The heads (contrastive projections, MLM vocabulary, ITM, pixels) stay whole on every rank.
_ATTENTION = r".*\.(attn|self_attn|cross_attn)"
TP_PLAN = TensorParallelPlan(
    column=(rf"{_ATTENTION}\.q_proj\.weight$", rf"{_ATTENTION}\.k_proj\.weight$", rf"{_ATTENTION}\.v_proj\.weight$",
            r".*\.mlp\.up_proj\.weight$"),
    row=(rf"{_ATTENTION}\.out_proj\.weight$", r".*\.mlp\.down_proj\.weight$"),
)


def tp_divisible(cfg: MaskVLMConfig) -> dict[str, int]:
    """Each tensor-parallel rank holds whole attention heads, in the encoders and the decoders."""
    return {"model.vision.heads": cfg.vision.heads, "model.text.heads": cfg.text.heads,
            "model.text_decoder.heads": cfg.text_decoder.heads, "model.image_decoder.heads": cfg.image_decoder.heads}
