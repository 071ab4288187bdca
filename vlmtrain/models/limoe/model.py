"""LIMoE: one transformer for image patches and text tokens, sparse expert MLPs, a learnable temperature.

Each modality has its own embeddings, positional embeddings and projection (and final norm, unless
``shared_final_norm``); the blocks, attention and experts are shared. Images and texts go through
the blocks in separate passes, as in the paper, so each modality's routing is its own: the forward
returns each pass's router probabilities for the entropy losses, and keeps each pass's routing
(``last_routing``) for the diagnostics.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmtrain.models.common.blocks import Block
from vlmtrain.models.common.moe import MoEBlock, Routing
from vlmtrain.models.limoe.config import LIMoEConfig

MODALITIES = ("image", "text")


class LIMoE(nn.Module):
    def __init__(self, cfg: LIMoEConfig, ep_size: int = 1, ep_rank: int = 0):
        super().__init__()
        width, grid = cfg.width, cfg.image_size // cfg.patch_size
        self.text_causal = cfg.text_causal
        self.patch_embed = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.image_positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(grid * grid, width))
        self.token_embedding = nn.Embedding(cfg.vocab_size, width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.text_positional_embedding = nn.Parameter(0.01 * torch.randn(cfg.context_length, width))
        moe_layers = set(cfg.moe_layers())
        self.blocks = nn.ModuleList(
            MoEBlock(width, cfg.heads, cfg.mlp_ratio, cfg.moe, ep_size, ep_rank) if i in moe_layers
            else Block(width, cfg.heads, cfg.mlp_ratio) for i in range(cfg.layers))
        if cfg.shared_final_norm:
            self.final_norm = nn.LayerNorm(width)
        else:
            self.image_norm, self.text_norm = nn.LayerNorm(width), nn.LayerNorm(width)
        self.image_proj = nn.Linear(width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.full((1,), cfg.init_logit_scale))  # [1]: DeepSpeed flattens it
        # Per modality, per MoE block: the routing of the last pass (detached use only: diagnostics).
        self.last_routing: dict[str, list[Routing]] = {}

    def _norm(self, modality: str) -> nn.LayerNorm:
        return getattr(self, "final_norm", None) or getattr(self, f"{modality}_norm")

    def _encode(self, x: torch.Tensor, modality: str, causal: bool) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, causal=causal)
        routings = [block.routing() for block in self.blocks if isinstance(block, MoEBlock)]
        self.last_routing[modality] = [r for r in routings if r is not None] if not x.is_meta else []
        for block in self.blocks:
            if isinstance(block, MoEBlock):
                block.mlp.gate.last = None
        return self._norm(modality)(x)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.image_positional_embedding.to(images.dtype)
        features = self.image_proj(self._encode(x, "image", causal=False).mean(dim=1))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.text_positional_embedding[: tokens.shape[1]]
        x = self._encode(x, "text", causal=self.text_causal)
        # open_clip's tokenizer gives EOT the largest id: pool there (as CLIP's text tower does).
        features = self.text_proj(x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)])
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalized features and temperature (the contrastive loss's inputs), the mean ``l_aux`` over
        MoE blocks and passes, and each pass's router probabilities ``[blocks, tokens, experts]``."""
        out = {"image_features": F.normalize(self.encode_image(images), dim=-1),
               "text_features": F.normalize(self.encode_text(tokens), dim=-1),
               "logit_scale": self.logit_scale.exp()}
        routings = self.last_routing  # both passes' now
        if routings["image"]:
            out["l_aux"] = torch.stack([r.l_aux for m in MODALITIES for r in routings[m]]).mean()
            for modality in MODALITIES:
                out[f"{modality}_router_probs"] = torch.stack([r.probs for r in routings[modality]])
        return out
