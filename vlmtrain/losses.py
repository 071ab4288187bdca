"""Contrastive losses. Each rank computes a *local* loss against features gathered from all ranks.

Gathering with gradients lets every rank's backward reach the features of the others, so the
mean of the local losses (what data-parallel averaging optimises) has the gradient of the full
global-batch loss, at O(local × global) rather than O(global²) logits per rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from vlmtrain.dist import rank_and_world


def gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """Concatenate ``features`` from every rank, in rank order, keeping the autograd graph.

    Functional collectives are torch's replacement for the deprecated ``torch.distributed.nn``
    gather; their backward reduce-scatters the gradients back to the owning ranks.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    return funcol.all_gather_single(features.contiguous(), 0, dist.group.WORLD)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE (open_clip's ClipLoss with local_loss=True, gather_with_grad=True)."""

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        all_image = gather_with_grad(image_features)
        all_text = gather_with_grad(text_features)
        rank, _ = rank_and_world()
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

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor) -> torch.Tensor:
        all_text = gather_with_grad(text_features)
        rank, _ = rank_and_world()
        local = image_features.shape[0]
        logits = logit_scale * image_features @ all_text.T + logit_bias
        labels = -torch.ones_like(logits)
        own = torch.arange(local, device=logits.device)
        labels[own, own + rank * local] = 1.0
        return -F.logsigmoid(labels * logits).sum() / local


LOSSES = {"clip": ClipLoss, "siglip": SigLipLoss}


def build_loss(name: str) -> nn.Module:
    """The loss a run's ``loss`` key names; it is called with the model's output dict."""
    return LOSSES[name]()
