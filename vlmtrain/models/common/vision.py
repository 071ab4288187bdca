"""ViT image tower, laid out like open_clip's VisionTransformer (class token, ln_pre, ln_post)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vlmtrain.configlib import at_least
from vlmtrain.errors import ConfigError
from vlmtrain.models.common.blocks import Transformer


@dataclass
class VisionConfig:
    image_size: int = field(default=32, metadata=at_least(8))
    patch_size: int = field(default=8, metadata=at_least(1))
    width: int = field(default=64, metadata=at_least(8))
    layers: int = field(default=2, metadata=at_least(1))
    heads: int = field(default=2, metadata=at_least(1))
    mlp_ratio: float = field(default=4.0, metadata=at_least(0.25))

    def check(self, prefix: str) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"{prefix}.image_size={self.image_size} is not divisible by "
                              f"{prefix}.patch_size={self.patch_size}")
        check_heads(prefix, self.width, self.heads)


def check_heads(prefix: str, width: int, heads: int) -> None:
    if width % heads:
        raise ConfigError(f"{prefix}.width={width} is not divisible by {prefix}.heads={heads}")


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        width = cfg.width
        grid = cfg.image_size // cfg.patch_size
        scale = width ** -0.5
        self.patch_embed = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_ratio)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)

    # embed → transformer blocks → pool: the stages a pipeline splits the tower into.
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, grid*grid, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.ln_post(x[:, 0]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.transformer(self.embed(images)))
