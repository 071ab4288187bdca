"""FLAVA: an image encoder, a text encoder, a multimodal fusion encoder over both, and their heads.

One training forward runs two views of each pair (as FLAVA does):

- **unmasked**: image and text through their encoders → the global contrastive features (CLS tokens
  through the contrastive projections); their hidden states through the fusion encoder, each image
  with its own text or (with ``itm_negative_prob``) another sample's → ITM on the fusion CLS;
- **masked**: the image with ~40% of its patches replaced by a learned [MASK] embedding (BEiT style:
  the encoder sees the whole grid, so it can predict at the masked places) and the BERT-masked text
  through the same encoders → MIM and MLM heads at the masked positions; their hidden states through
  the fusion encoder, image i with its own text i (positive pairs only) → MMM heads at the masked
  image and text positions.

Cost: each encoder runs twice and the fusion encoder twice per sample, so a step costs about twice
a CLIP step with the same encoders plus two fusion passes (and the vocabulary-sized MLM/MMM heads,
applied only at masked positions): by ``count_flops_per_sample``, ``flava_base`` costs 446 GFLOP per
sample against 123 for CLIP ViT-B/16, and the demo's ``flava_tiny`` 7.5× the demo CLIP (its heads
dominate at width 64). The swapped (negative) ITM pairs are never fused masked: MMM only sees pairs
that belong together.

Randomness in the forward (which texts are swapped for ITM) comes from torch's global generator,
which the trainer seeds per step, micro-batch and data-parallel rank, so tensor-parallel peers draw
the same swaps and a resumed run the same ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmtrain.models.common.blocks import Transformer
from vlmtrain.models.common.masking import PAD_ID, patch_pixels
from vlmtrain.models.common.objectives import itm_pairs
from vlmtrain.models.common.text import TextConfig
from vlmtrain.models.common.vision import VisionConfig, VisionTower
from vlmtrain.models.flava.config import FLAVAConfig


def padding_mask(tokens: torch.Tensor, prefix: int = 0) -> torch.Tensor:
    """[B, 1, 1, prefix + L] bool for attention: every query may attend to the ``prefix`` tokens
    before the text and to the text's non-padding tokens."""
    keys = tokens != PAD_ID
    if prefix:
        keys = torch.cat([keys.new_ones(keys.shape[0], prefix), keys], dim=1)
    return keys[:, None, None, :]


class TextEncoder(nn.Module):
    """A bidirectional text transformer (BERT-like, for MLM) that ignores padding, pooled at its first
    token (SOT, the CLS)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.drop_path)
        self.ln_final = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, L, width] after the final norm."""
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        return self.ln_final(self.transformer(x, attn_mask=padding_mask(tokens)))


class ImageEncoder(VisionTower):
    """The common ViT plus a learned [MASK] patch embedding; its ``proj`` is the image contrastive
    projection. Masked patches are replaced before positions are added (BEiT), so the encoder sees the
    whole grid and can predict at the masked places. (Subclassed rather than wrapped so that ZeRO-3,
    which gathers a module's own parameters when its forward runs, sees every use of them.)"""

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__(cfg, embed_dim)
        self.mask_token = nn.Parameter(0.02 * torch.randn(cfg.width))

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None, hidden: bool = False) -> torch.Tensor:
        """The contrastive features [B, embed_dim], or with ``hidden`` the hidden states
        [B, 1 + patches, width] after ``ln_post``; ``mask`` [B, patches] marks the patches replaced."""
        if mask is None:  # the common embedding: FLIP's patch dropout, if configured, thins this view only
            x = self.embed(images)
        else:
            x = self.patch_embed(images).flatten(2).transpose(1, 2)
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))
        x = self.ln_post(self.transformer(x))
        return x if hidden else self.proj(x[:, 0])


def take(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows ``positions`` [B, K] of each sample of ``x`` [B, T, D] → [B, K, D]."""
    return torch.gather(x, 1, positions.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class FLAVA(nn.Module):
    def __init__(self, cfg: FLAVAConfig):
        super().__init__()
        self.cfg = cfg
        vision, text, fusion = cfg.vision, cfg.text, cfg.fusion
        pixels = vision.patch_size ** 2 * 3
        self.visual = ImageEncoder(vision, cfg.embed_dim)
        self.text = TextEncoder(text)
        self.text_proj = nn.Linear(text.width, cfg.embed_dim, bias=False)
        self.image_to_mm = nn.Linear(vision.width, fusion.width)
        self.text_to_mm = nn.Linear(text.width, fusion.width)
        self.fusion_cls = nn.Parameter(0.02 * torch.randn(fusion.width))
        self.fusion = Transformer(fusion.width, fusion.layers, fusion.heads, fusion.mlp_ratio)
        self.fusion_ln = nn.LayerNorm(fusion.width)
        self.mim_head = nn.Linear(vision.width, pixels)
        self.mlm_head = nn.Linear(text.width, text.vocab_size)
        self.mmm_image_head = nn.Linear(fusion.width, pixels)
        self.mmm_text_head = nn.Linear(fusion.width, text.vocab_size)
        self.itm_head = nn.Linear(fusion.width, 2)
        # Shape [1], not []: DeepSpeed cannot flatten 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), cfg.init_logit_scale))

    # ---------------------------------------------------------------- contrastive heads (zero-shot eval)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text_proj(self.text(tokens)[:, 0])
        return F.normalize(features, dim=-1) if normalize else features

    # ---------------------------------------------------------------- training

    def fuse(self, image_states: torch.Tensor, text_states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Fusion hidden states [B, 1 + image tokens + text tokens, width]: [fusion CLS; image; text],
        the text's padding (in ``tokens``) hidden from attention."""
        cls = self.fusion_cls.to(image_states.dtype).expand(image_states.shape[0], 1, -1)
        x = torch.cat([cls, self.image_to_mm(image_states), self.text_to_mm(text_states)], dim=1)
        return self.fusion_ln(self.fusion(x, attn_mask=padding_mask(tokens, 1 + image_states.shape[1])))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, mim_positions: torch.Tensor,
                mlm_tokens: torch.Tensor, mlm_positions: torch.Tensor, mlm_labels: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """``mim_positions`` [B, n]: the masked patches of each image; ``mlm_tokens`` [B, L]: the
        BERT-masked text; ``mlm_positions``/``mlm_labels`` [B, M]: its masked positions and their original
        ids (label -100: an unused slot). Returns what ``FlavaObjective`` takes."""
        patches = self.visual.positional_embedding.shape[0] - 1
        # Unmasked view: contrastive features and ITM.
        image_states = self.visual(images, hidden=True)
        text_states = self.text(tokens)
        image_features = F.normalize(self.visual.proj(image_states[:, 0]), dim=-1)
        text_features = F.normalize(self.text_proj(text_states[:, 0]), dim=-1)
        logit_scale = self.logit_scale.exp()
        text_index, itm_labels = self.itm_pairs(logit_scale * image_features @ text_features.T)
        itm_logits = self.itm_head(self.fuse(image_states, text_states[text_index], tokens[text_index])[:, 0])

        # Masked view: MIM and MLM on the encoders, MMM on the fusion of positive pairs.
        mask = torch.zeros(images.shape[0], patches, dtype=torch.bool, device=images.device)
        mask.scatter_(1, mim_positions, True)
        masked_image_states = self.visual(images, mask, hidden=True)
        masked_text_states = self.text(mlm_tokens)
        fused = self.fuse(masked_image_states, masked_text_states, mlm_tokens)
        image_at = mim_positions + 1  # after the image CLS
        text_at = mlm_positions
        mim_target = take(patch_pixels(images, self.cfg.vision.patch_size), mim_positions)
        return {
            "image_features": image_features,
            "text_features": text_features,
            "logit_scale": logit_scale,
            "mim_pred": self.mim_head(take(masked_image_states, image_at)),
            "mim_target": mim_target,
            "mlm_logits": self.mlm_head(take(masked_text_states, text_at)),
            "mlm_labels": mlm_labels,
            "mmm_image_pred": self.mmm_image_head(take(fused, image_at + 1)),  # after the fusion CLS
            "mmm_text_logits": self.mmm_text_head(take(fused, text_at + 2 + patches)),
            "itm_logits": itm_logits,
            "itm_labels": itm_labels,
        }

    def itm_pairs(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which text each image is fused with for ITM, and whether it is its own (label 1): swapped
        with ``itm_negative_prob``, for a uniform other text or, with ``itm_hard_negatives``, one drawn
        with probability softmax over the image's contrastive ``logits`` [B, B] (ALBEF's hard negatives)."""
        similarity = logits.detach() if self.cfg.itm_hard_negatives else None
        partner, labels = itm_pairs(logits.shape[0], self.cfg.itm_negative_prob, similarity=similarity)
        return partner.to(logits.device), labels.to(logits.device)


