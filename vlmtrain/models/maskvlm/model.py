"""MaskVLM: image and text encoders, a text decoder that attends to the image (MLM, ITM) and a small
image decoder that attends to the text (MIM), plus a contrastive head (ITC).

One training forward runs each encoder twice and each decoder on what the other modality left unmasked:

====================  ==============================  ===============================================
pass                  input                           used by
====================  ==============================  ===============================================
image encoder         all N patches (+ class token)   ITC (pooled), memory of the MLM and ITM decoders
image encoder         the (1-mim_ratio)·N visible     MIM decoder input (MAE: only visible tokens are
                      patches only                    encoded, ≈0.4 of the full pass at 60% masking)
text encoder          the caption                     ITC (pooled at EOT), memory of the MIM decoder,
                                                      queries of the ITM decoder
text encoder          the caption with mlm_ratio of   MLM decoder input
                      its tokens BERT-masked
text decoder          masked caption → full image     MLM at the masked positions only
text decoder          own and swapped captions →      ITM (2B pairs: B matched, B swapped)
                      each image
image decoder         visible + [MASK] tokens →       MIM: pixels of the masked patches (L1)
                      full caption
====================  ==============================  ===============================================

So the encoders cost ≈1.4× a CLIP image pass and 2× a CLIP text pass, plus the decoders (the text
decoder runs on 3B captions). The text encoder is causal (open_clip's layout, pooled at EOT, so
``encode_text`` is a CLIP text tower); the decoders' self-attention is bidirectional, which gives MLM
both sides of a masked token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmtrain.models.common.blocks import CrossAttentionBlock
from vlmtrain.models.common.masking import IGNORE_INDEX, PAD_ID, patch_pixels
from vlmtrain.models.common.objectives import itm_pairs
from vlmtrain.models.common.text import TextTower
from vlmtrain.models.common.vision import VisionTower
from vlmtrain.models.maskvlm.config import MaskVLMConfig


class ImageEncoder(VisionTower):
    """The ViT, returning its pooled embedding and every token. One module call per pass, so ZeRO-3
    gathers the tower's own parameters (class and positional embeddings) for it."""

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.encode_tokens(images, keep)  # [B, 1+K, width] after ln_post
        return self.proj(tokens[:, 0]), tokens


class TextEncoder(TextTower):
    """The causal text transformer, returning its EOT embedding (when ``pool``) and every token."""

    def forward(self, tokens: torch.Tensor, pool: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        x = self.ln_final(self.transformer(self.embed(tokens), causal=True))
        # open_clip's tokenizer gives EOT the largest id of a caption; a masked caption is never pooled
        # (its [MASK] id is larger still).
        pooled = self.proj(x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]) if pool else None
        return pooled, x


class TextDecoder(nn.Module):
    """Text tokens attending to image tokens; an MLM head (vocabulary logits) and an ITM head (matched
    or not, read at the caption's EOT position: the token ITC pools, as ALBEF's ITM reads the [CLS] its
    ITC pools, so ITM starts from the text summary the contrastive term aligns with the image)."""

    def __init__(self, cfg: MaskVLMConfig):
        super().__init__()
        d = cfg.text_decoder
        self.blocks = nn.ModuleList(CrossAttentionBlock(d.width, d.heads, d.mlp_ratio, cfg.vision.width)
                                    for _ in range(d.layers))
        self.ln = nn.LayerNorm(d.width)
        self.mlm_head = nn.Linear(d.width, cfg.text.vocab_size)
        self.itm_head = nn.Linear(d.width, 2)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            text = block(text, image, key_mask=text_mask)
        return self.ln(text)


class ImageDecoder(nn.Module):
    """MAE's decoder with cross-attention: the encoded visible patches, projected to the decoder's width,
    and a learned [MASK] token at every hidden patch, each plus its position, attend to each other and to
    the caption; a linear head predicts every patch's pixels (the loss reads the hidden ones)."""

    def __init__(self, cfg: MaskVLMConfig):
        super().__init__()
        d = cfg.image_decoder
        self.embed = nn.Linear(cfg.vision.width, d.width)
        self.mask_token = nn.Parameter(0.02 * torch.randn(d.width))
        self.positional_embedding = nn.Parameter(0.02 * torch.randn(cfg.num_patches, d.width))
        self.blocks = nn.ModuleList(CrossAttentionBlock(d.width, d.heads, d.mlp_ratio, cfg.text.width)
                                    for _ in range(d.layers))
        self.ln = nn.LayerNorm(d.width)
        self.head = nn.Linear(d.width, 3 * cfg.vision.patch_size ** 2)

    def forward(self, visible: torch.Tensor, order: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor) -> torch.Tensor:
        """``visible`` [B, K, width]: the encoded patches ``order[:, :K]``; the rest of ``order`` [B, N]
        are the hidden ones. Returns [B, N, 3·p·p], patches in raster order."""
        batch, patches = order.shape
        x = torch.cat([self.embed(visible), self.mask_token.expand(batch, patches - visible.shape[1], -1)], dim=1)
        x = x.gather(1, order.argsort(dim=1).unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # back to raster order
        x = x + self.positional_embedding
        for block in self.blocks:
            x = block(x, text, memory_mask=text_mask)
        return self.head(self.ln(x))


class MaskVLM(nn.Module):
    def __init__(self, cfg: MaskVLMConfig):
        super().__init__()
        self.patch_size = cfg.vision.patch_size
        # Fixed shapes, so the forward also runs on the meta device (FLOP counts, memory plans).
        self.visible_patches = cfg.num_patches - cfg.mim_masked_patches
        self.mlm_slots = cfg.mlm_slots
        self.hard_negatives = cfg.itm_hard_negatives
        self.visual = ImageEncoder(cfg.vision, cfg.embed_dim)
        self.text = TextEncoder(cfg.text, cfg.embed_dim)
        self.text_decoder = TextDecoder(cfg)
        self.image_decoder = ImageDecoder(cfg)
        # Shape [1], not []: DeepSpeed cannot flatten 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), cfg.init_logit_scale))

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features, _ = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features, _ = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, image_mask: torch.Tensor,
                mlm_tokens: torch.Tensor, mlm_labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``image_mask`` [B, N] bool (True = masked; ``cfg.mim_masked_patches`` per image), ``mlm_tokens``
        and ``mlm_labels`` [B, L]: the BERT-masked caption and the original ids where masked, else -100."""
        image_features, image_tokens = self.visual(images)
        text_features, text_tokens = self.text(tokens)
        text_mask = tokens != PAD_ID

        # MLM: the masked caption, decoded against the unmasked image; logits at the labelled positions
        # (moved to the first mlm_slots places; the slots left over carry -100).
        _, masked_text = self.text(mlm_tokens, pool=False)
        decoded = self.text_decoder(masked_text, text_mask, image_tokens)
        slots = (mlm_labels == IGNORE_INDEX).long().argsort(dim=1, stable=True)[:, :self.mlm_slots]
        mlm_logits = self.text_decoder.mlm_head(decoded.gather(1, slots.unsqueeze(-1).expand(-1, -1, decoded.shape[-1])))

        # MIM: the visible patches alone through the encoder, decoded against the unmasked caption.
        order = image_mask.long().argsort(dim=1, stable=True)  # visible patches first, each part ascending
        _, visible = self.visual(images, order[:, :self.visible_patches])
        mim_pred = self.image_decoder(visible[:, 1:], order, text_tokens, text_mask)

        # ITM: every image with its own caption (label 1) and with a swapped one (label 0, objectives.itm_pairs).
        similarity = (image_features @ text_features.T) if self.hard_negatives else None
        partner, labels = itm_pairs(len(tokens), 1.0, similarity=similarity)
        partner, labels = partner.to(tokens.device), labels.to(tokens.device)
        matched = self.text_decoder(torch.cat([text_tokens, text_tokens[partner]]),
                                    torch.cat([text_mask, text_mask[partner]]), image_tokens.repeat(2, 1, 1))
        pairs = torch.cat([tokens, tokens[partner]])
        itm_logits = self.text_decoder.itm_head(matched[torch.arange(len(pairs), device=pairs.device),
                                                        pairs.argmax(dim=-1)])  # at each caption's EOT

        return {"image_features": F.normalize(image_features, dim=-1),
                "text_features": F.normalize(text_features, dim=-1),
                "logit_scale": self.logit_scale.exp(),
                "mlm_logits": mlm_logits, "mlm_labels": mlm_labels.gather(1, slots),
                "mim_pred": mim_pred, "mim_target": patch_pixels(images, self.patch_size, normalize=False),
                "mim_mask": image_mask,
                "itm_logits": itm_logits, "itm_labels": torch.cat([torch.ones_like(labels), labels]),
                "itm_partner": partner}


