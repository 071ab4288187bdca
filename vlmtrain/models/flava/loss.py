"""FLAVA's objectives, each a named term, and their weighted sum under ``loss``.

The global contrastive term is CLIP's (features gathered over the data-parallel group with their
gradients, labels offset by the rank); the others are local to each rank's samples. MIM/MMM-image
are mean squared errors on the masked patches' normalized pixels; MLM/MMM-text cross-entropies over
the masked tokens (slots labelled -100 are empty); ITM a two-way cross-entropy on the fusion CLS.
"""
from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from vlmtrain.models.clip.loss import ClipLoss
from vlmtrain.models.common.objectives import masked_patch_loss, masked_token_loss
from vlmtrain.models.flava.config import FLAVAConfig, LossWeights


class FlavaObjective(nn.Module):
    def __init__(self, cfg: FLAVAConfig, group: ProcessGroup | None = None):
        super().__init__()
        self.weights = cfg.weights
        self.contrastive = ClipLoss(group)

    def forward(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {name: value.float() if value.is_floating_point() else value for name, value in out.items()}
        terms = {
            "contrastive": self.contrastive(out["image_features"], out["text_features"], out["logit_scale"]),
            "mim": patch_loss(out["mim_pred"], out["mim_target"]),
            "mlm": masked_token_loss(out["mlm_logits"], out["mlm_labels"]),
            "mmm_image": patch_loss(out["mmm_image_pred"], out["mim_target"]),
            "mmm_text": masked_token_loss(out["mmm_text_logits"], out["mlm_labels"]),
            "itm": F.cross_entropy(out["itm_logits"], out["itm_labels"]),
        }
        total = sum(getattr(self.weights, f.name) * terms[f.name] for f in fields(LossWeights))
        return {"loss": total, **terms}


def patch_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the masked patches: the model gathered them already ([B, masked, D])."""
    return masked_patch_loss(prediction, target, torch.ones(prediction.shape[:2], dtype=torch.bool,
                                                            device=prediction.device))

