"""MaskVLM's objective: four named terms and their weighted sum under ``loss``.

- ``itc``: CLIP's contrastive loss, features gathered over the data-parallel group with gradients
  and labels offset by the dp rank (``models/clip/loss.ClipLoss``);
- ``itm``: cross-entropy of matched / swapped pairs (the model pairs each image with its own caption
  and with one swapped in from the batch: ``objectives.itm_pairs``);
- ``mlm``: cross-entropy at the masked caption positions only;
- ``mim``: L1 (or MSE) on the pixels of the masked patches only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from vlmtrain.models.clip.loss import ClipLoss
from vlmtrain.models.common.objectives import masked_patch_loss, masked_token_loss
from vlmtrain.models.maskvlm.config import MaskVLMConfig

TERMS = ("itc", "itm", "mlm", "mim")


class MaskVLMObjective(nn.Module):
    def __init__(self, cfg: MaskVLMConfig, group: ProcessGroup | None = None):
        super().__init__()
        self.itc = ClipLoss(group)
        self.weights = {name: getattr(cfg.weights, name) for name in TERMS}
        self.mim_loss = cfg.mim_loss

    def forward(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms = {
            "itc": self.itc(out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float()),
            "itm": F.cross_entropy(out["itm_logits"].float(), out["itm_labels"]),
            "mlm": masked_token_loss(out["mlm_logits"], out["mlm_labels"]),
            "mim": masked_patch_loss(out["mim_pred"], out["mim_target"], out["mim_mask"], self.mim_loss),
        }
        return {"loss": sum(self.weights[name] * value for name, value in terms.items()), **terms}

