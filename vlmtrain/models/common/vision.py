"""ViT image tower, laid out like open_clip's VisionTransformer (class token, ln_pre, ln_post).

Visible-token encoding (MAE): given ``keep`` ([B, K] patch indices), the tower encodes the class
token and those K patches only; positional embeddings are added before the gather, so each kept patch
sits where it was. FLIP's patch dropout is the same with a random ``keep`` drawn in training.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vlmtrain.configlib import at_least
from vlmtrain.errors import ConfigError
from vlmtrain.models.common.blocks import Transformer
from vlmtrain.models.common.masking import patch_dropout_keep
from vlmtrain.models.common.stack import check_heads


@dataclass
class VisionConfig:
    image_size: int = field(default=32, metadata=at_least(8))
    patch_size: int = field(default=8, metadata=at_least(1))
    width: int = field(default=64, metadata=at_least(8))
    layers: int = field(default=2, metadata=at_least(1))
    heads: int = field(default=2, metadata=at_least(1))
    mlp_ratio: float = field(default=4.0, metadata=at_least(0.25))
    # FLIP: the share of patches left out in training (all are encoded at eval), in [0, 1).
    patch_dropout: float = 0.0
    # Stochastic depth of the last block (block l of L drops rate·l/L), in [0, 1).
    drop_path: float = 0.0

    def check(self, prefix: str) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"{prefix}.image_size={self.image_size} is not divisible by "
                              f"{prefix}.patch_size={self.patch_size}")
        check_heads(prefix, self.width, self.heads)
        check_below_one(prefix, "patch_dropout", self.patch_dropout)
        check_below_one(prefix, "drop_path", self.drop_path)


def check_below_one(prefix: str, key: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"config key '{prefix}.{key}': got {value!r}, must be >= 0 and < 1")


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        width = cfg.width
        grid = cfg.image_size // cfg.patch_size
        scale = width ** -0.5
        self.patch_dropout = cfg.patch_dropout
        self.patch_embed = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.drop_path)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)

    # embed → transformer blocks → pool: the stages a pipeline splits the tower into.
    def embed(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 1+K, width]: the class token, then patches ``keep`` ([B, K] indices in raster order;
        all N without). Without ``keep``, a training tower with patch dropout keeps a random subset."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, N, width]
        x = x + self.positional_embedding[1:].to(x.dtype)
        if keep is None and self.training and self.patch_dropout > 0:
            keep = patch_dropout_keep(x.shape[0], x.shape[1], self.patch_dropout, x.device)
        if keep is not None:
            x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = self.class_embedding.to(x.dtype) + self.positional_embedding[0].to(x.dtype)
        cls = cls.expand(x.shape[0], 1, -1)
        return self.ln_pre(torch.cat([cls, x], dim=1))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.ln_post(x[:, 0]))

    def encode_tokens(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Every encoded token after ``ln_post``, [B, 1+K, width] (class token first, then ``keep``'s
        patches in its order); ``proj(encode_tokens(...)[:, 0])`` is ``forward``'s output."""
        return self.ln_post(self.transformer(self.embed(images, keep)))

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.pool(self.transformer(self.embed(images, keep)))


def openclip_transform(image_size: int, train: bool):
    """open_clip's image transforms (OpenAI mean/std), so eval matches open_clip exactly. open_clip is
    imported here, not at the top: the launcher process reads configs and never needs it."""
    import open_clip

    return open_clip.image_transform(image_size, is_train=train)
