"""CLIP / SigLIP model arguments and their named presets (model configs as data, as in open_clip)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from vlmtrain.configlib import at_least, choices
from vlmtrain.errors import ConfigError
from vlmtrain.models.common.temperature import INIT_LOGIT_SCALE
from vlmtrain.models.common.text import TextConfig
from vlmtrain.models.common.vision import VisionConfig

SIGLIP_INIT = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}


@dataclass
class CLIPConfig:
    """Two towers and a learnable temperature. ``preset`` names the dimensions; other keys override them.

    ``loss: siglip`` is the sigmoid loss with a learnable bias; alone it gives SigLIP's init
    (``init_logit_scale`` = log 10, ``init_logit_bias`` = -10) unless those are given.
    """
    family: str = "clip"
    preset: str = "tiny"
    loss: str = field(default="clip", metadata=choices("clip", "siglip"))
    embed_dim: int = field(default=64, metadata=at_least(1))
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_logit_scale: float = INIT_LOGIT_SCALE
    init_logit_bias: float | None = None

    def check(self, prefix: str = "model") -> None:
        self.vision.check(f"{prefix}.vision")
        self.text.check(f"{prefix}.text")
        if self.loss == "siglip" and self.init_logit_bias is None:
            raise ConfigError(f"{prefix}.loss=siglip needs {prefix}.init_logit_bias (SigLIP's learnable bias)")
        if self.loss == "clip" and self.init_logit_bias is not None:
            raise ConfigError(f"{prefix}.init_logit_bias is only used by {prefix}.loss=siglip; "
                              f"remove it for loss=clip")


PRESETS: dict[str, dict] = {
    # Sized for CPU tests and the demo.
    "tiny": {
        "embed_dim": 64,
        "vision": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 2},
        "text": {"context_length": 32, "width": 64, "layers": 2, "heads": 2},
    },
    # open_clip's ViT-B-32, ViT-B-16 and ViT-L-14 dimensions.
    "vit_b_32": {
        "embed_dim": 512,
        "vision": {"image_size": 224, "patch_size": 32, "width": 768, "layers": 12, "heads": 12},
        "text": {"context_length": 77, "width": 512, "layers": 12, "heads": 8},
    },
    "vit_b_16": {
        "embed_dim": 512,
        "vision": {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12, "heads": 12},
        "text": {"context_length": 77, "width": 512, "layers": 12, "heads": 8},
    },
    "vit_l_14": {
        "embed_dim": 768,
        "vision": {"image_size": 224, "patch_size": 14, "width": 1024, "layers": 24, "heads": 16},
        "text": {"context_length": 77, "width": 768, "layers": 12, "heads": 12},
    },
}


def loss_defaults(raw: dict) -> dict:
    """What ``loss: siglip`` implies for keys the user left out."""
    return dict(SIGLIP_INIT) if raw.get("loss") == "siglip" else {}


def migrate_legacy(saved: dict) -> dict:
    """A model config written before model families (``name`` for the preset, the loss kept in the
    run config): the same CLIP in today's keys. SigLIP models are the ones with a logit bias."""
    saved = dict(saved)
    return {"family": "clip", "preset": saved.pop("name", "tiny"),
            "loss": "clip" if saved.get("init_logit_bias") is None else "siglip", **saved}
