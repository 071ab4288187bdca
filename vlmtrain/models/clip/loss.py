"""Contrastive losses. Each rank computes a *local* loss against features gathered from its
data-parallel group (tensor and pipeline peers hold the same samples, so they are not gathered).

Gathering with gradients lets every rank's backward reach the features of the others, so the
mean of the local losses (what data-parallel averaging optimises) has the gradient of the full
global-batch loss, at O(local × global) rather than O(global²) logits per rank.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from vlmtrain.distributed.collectives import gather_with_grad, rank_and_size


class ClipLoss(nn.Module):
    """Symmetric InfoNCE (open_clip's ClipLoss with local_loss=True, gather_with_grad=True)."""

    def __init__(self, group: ProcessGroup | None = None):
        super().__init__()
        self.group = group

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        all_image = gather_with_grad(image_features, self.group)
        all_text = gather_with_grad(text_features, self.group)
        rank, _ = rank_and_size(self.group)
        local = image_features.shape[0]
        labels = torch.arange(local, device=image_features.device) + rank * local
        logits_per_image = logit_scale * image_features @ all_text.T
        logits_per_text = logit_scale * text_features @ all_image.T
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (Zhai et al. 2023), open_clip's ``SigLipLoss`` numerics.

    Each rank scores its images against the texts of every rank: the pair (i, i) is positive,
    every other pair negative. The local sum is divided by the local batch, so the mean over ranks
    equals the single-process loss on the whole batch. open_clip passes text blocks around a ring
    instead of gathering them; the sums are the same.
    """

    def __init__(self, group: ProcessGroup | None = None):
        super().__init__()
        self.group = group

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor) -> torch.Tensor:
        all_text = gather_with_grad(text_features, self.group)
        rank, _ = rank_and_size(self.group)
        local = image_features.shape[0]
        logits = logit_scale * image_features @ all_text.T + logit_bias
        labels = -torch.ones_like(logits)
        own = torch.arange(local, device=logits.device)
        labels[own, own + rank * local] = 1.0
        return -F.logsigmoid(labels * logits).sum() / local


LOSSES = {"clip": ClipLoss, "siglip": SigLipLoss}


class ContrastiveObjective(nn.Module):
    """The CLIP family's objective: one named term, ``contrastive``, and the total ``loss``."""

    def __init__(self, kind: str, group: ProcessGroup | None = None):
        super().__init__()
        self.loss = LOSSES[kind](group)

    def forward(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        contrastive = self.loss(**{name: value.float() for name, value in out.items()})
        return {"loss": contrastive, "contrastive": contrastive}
