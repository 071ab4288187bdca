"""LIMoE's objective: the contrastive loss plus DeepSpeed's load balancing and the per-modality
entropy auxiliaries of Mustafa et al. 2022, each weighted and returned as a named term."""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed import ProcessGroup

from vlmtrain.models.clip.loss import ClipLoss
from vlmtrain.models.limoe.config import LIMoELossConfig
from vlmtrain.models.limoe.model import MODALITIES


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of distributions along the last axis; 0·log 0 = 0."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1)


def local_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean per-token routing entropy of ``probs`` [blocks, tokens, experts], averaged over blocks."""
    return entropy(probs).mean()


def global_entropy_loss(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """max(0, threshold − H(mean routing distribution)) per block, averaged over blocks."""
    return (threshold - entropy(probs.mean(dim=1))).clamp_min(0).mean()


class LIMoEObjective(nn.Module):
    """Terms: ``contrastive``, ``l_aux``, ``<modality>_local_entropy`` and ``<modality>_global_entropy``
    (unweighted, for the logs), and ``loss``, their weighted sum. The contrastive loss gathers
    features over the whole data-parallel group, whatever the expert parallelism."""

    def __init__(self, cfg: LIMoELossConfig, group: ProcessGroup | None = None):
        super().__init__()
        self.cfg = cfg
        self.contrastive = ClipLoss(group)

    def forward(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        contrastive = self.contrastive(out["image_features"].float(), out["text_features"].float(),
                                       out["logit_scale"].float())
        terms = {"contrastive": contrastive}
        total = contrastive
        if "l_aux" in out:  # a dense model (moe.every=0) has no router
            terms["l_aux"] = out["l_aux"]
            total = total + cfg.aux_weight * out["l_aux"]
            for modality in MODALITIES:
                probs = out[f"{modality}_router_probs"]
                local = local_entropy(probs)
                global_ = global_entropy_loss(probs, cfg.global_entropy_threshold)
                terms[f"{modality}_local_entropy"], terms[f"{modality}_global_entropy"] = local, global_
                total = total + cfg.local_entropy_weight * local + cfg.global_entropy_weight * global_
        return {"loss": total, **terms}
