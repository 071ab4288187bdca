"""Pieces of the masking families' objectives: image-text matching pairs, masked-token and
masked-patch losses. (The contrastive term is CLIP's ``ContrastiveObjective``.)"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmtrain.models.common.masking import IGNORE_INDEX


def itm_pairs(batch_size: int, negative_probability: float, generator: torch.Generator | None = None,
              similarity: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-text matching by in-batch swap: ``(partner, labels)``, both [B] long.

    Image i is paired with caption ``partner[i]``: its own (label 1) or, with probability
    ``negative_probability`` (a batch of one has no other caption), another one of the batch (label 0):
    uniformly among the others, or, given ``similarity`` ([B, B], image i × caption j), drawn with
    probability softmax(similarity[i]) over j ≠ i — hard negatives, as ALBEF. ``labels[i] == (partner[i] == i)``.
    Draws come from ``generator`` (None: the global RNG, on ``similarity``'s device when given).
    """
    if not 0.0 <= negative_probability <= 1.0:
        raise ValueError(f"negative_probability must be within [0, 1], got {negative_probability}")
    device = similarity.device if similarity is not None else torch.device("cpu")
    own = torch.arange(batch_size, device=device)
    if batch_size < 2:
        return own, torch.ones(batch_size, dtype=torch.long, device=device)
    negative = torch.rand(batch_size, generator=generator, device=device) < negative_probability
    if similarity is None:
        weights = torch.ones(batch_size, batch_size, device=device)
    else:
        if similarity.shape != (batch_size, batch_size):
            raise ValueError(f"similarity must be [{batch_size}, {batch_size}], got {tuple(similarity.shape)}")
        weights = similarity.detach().float().softmax(dim=1)
    weights = weights.masked_fill(torch.eye(batch_size, dtype=torch.bool, device=device), 0.0)
    # A row whose softmax put everything on the positive would have no weight left: uniform then.
    weights = torch.where(weights.sum(dim=1, keepdim=True) > 0, weights, (1.0 - torch.eye(batch_size, device=device)))
    other = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    partner = torch.where(negative, other, own)
    return partner, (~negative).long()


def masked_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose label is not -100 (logits [..., V], labels [...]);
    0 (with a gradient path) when there are none, where ``F.cross_entropy`` would give NaN. Summed and
    divided rather than branched on the labels: the meta device (FLOP counts, ``vlm-train plan``) has
    no values to branch on."""
    logits, labels = logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
    valid = labels != IGNORE_INDEX
    per_token = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    return (per_token * valid).sum() / valid.sum().clamp(min=1)


def masked_patch_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                      kind: str = "mse") -> torch.Tensor:
    """MAE's reconstruction loss: the per-patch mean squared (``mse``) or absolute (``l1``) error over
    the patch's values, averaged over the masked patches only (``mask`` [B, N] bool, True = masked;
    prediction and target [B, N, D]); 0 with a gradient path when nothing is masked."""
    if kind not in ("mse", "l1"):
        raise ValueError(f"kind must be 'mse' or 'l1', got {kind!r}")
    if prediction.shape != target.shape or prediction.shape[:2] != mask.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)}, target {tuple(target.shape)} and mask "
                         f"{tuple(mask.shape)} do not match")
    error = (prediction.float() - target.float())
    per_patch = (error.square() if kind == "mse" else error.abs()).mean(dim=-1)
    weights = mask.to(per_patch.dtype)
    return (per_patch * weights).sum() / weights.sum().clamp(min=1.0)
