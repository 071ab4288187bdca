"""CLIP: two towers and a learnable temperature."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmtrain.config import ModelConfig
from vlmtrain.models.text import TextTower
from vlmtrain.models.vision import VisionTower

LOGIT_SCALE_MAX = math.log(100.0)


class CLIP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.visual = VisionTower(cfg.vision, cfg.embed_dim)
        self.text = TextTower(cfg.text, cfg.embed_dim)
        # Shape [1], not []: DeepSpeed cannot flatten 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), cfg.init_logit_scale))
        # SigLIP's learnable bias; CLIP models have none (as in open_clip).
        self.logit_bias = (nn.Parameter(torch.full((1,), cfg.init_logit_bias))
                           if cfg.init_logit_bias is not None else None)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalized image and text features, the exponentiated logit scale and the bias if any."""
        out = {"image_features": self.encode_image(images, normalize=True),
               "text_features": self.encode_text(tokens, normalize=True),
               "logit_scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    def parameter_bounds(self) -> list[tuple[nn.Parameter, tuple[float, float]]]:
        """Parameters the trainer clamps after every step: the temperature stays within [1, 100]."""
        return [(self.logit_scale, (0.0, LOGIT_SCALE_MAX))]
