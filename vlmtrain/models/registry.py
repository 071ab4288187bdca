"""Model presets as data, resolved by name (open_clip's model-config registry, in miniature)."""
from __future__ import annotations

import copy

from vlmtrain.config import ConfigError, ModelConfig

PRESETS: dict[str, dict] = {
    # Sized for CPU tests and the demo.
    "tiny": {
        "embed_dim": 64,
        "vision": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 2},
        "text": {"context_length": 32, "width": 64, "layers": 2, "heads": 2},
    },
    # open_clip ViT-B-32 and ViT-B-16 dimensions.
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
}


def preset_dict(name: str) -> dict:
    if name not in PRESETS:
        raise ConfigError(f"config key 'model.name': got {name!r}, allowed values: {', '.join(PRESETS)}")
    return {"name": name, **copy.deepcopy(PRESETS[name])}


def build_model(cfg: ModelConfig):
    from vlmtrain.models.clip import CLIP

    return CLIP(cfg)
