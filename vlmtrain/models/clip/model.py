"""CLIP: two towers and a learnable temperature."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmtrain.models.clip.config import CLIPConfig
from vlmtrain.models.common.temperature import LOGGED_TEMPERATURE, TEMPERATURE_BOUNDS
from vlmtrain.models.common.text import TextTower
from vlmtrain.models.common.vision import VisionTower


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
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
        return self.head(self.encode_image(images), self.encode_text(tokens))

    def head(self, image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the loss takes: normalized features, the exponentiated logit scale, the bias if any."""
        out = {"image_features": F.normalize(image_features, dim=-1),
               "text_features": F.normalize(text_features, dim=-1),
               "logit_scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out


# The trainer clamps these after every step (the temperature stays within [1, 100]) and logs these
# (the temperature as the loss sees it), found by name wherever the layout put them.
PARAMETER_BOUNDS = TEMPERATURE_BOUNDS
LOGGED_PARAMETERS = {**LOGGED_TEMPERATURE, "logit_bias": float}
