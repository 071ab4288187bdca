"""Helpers shared by the tests: model configs and models the tests build themselves."""
from __future__ import annotations

from vlmtrain.models.registry import get_spec

CLIP_SPEC = get_spec("clip")


def clip_config(preset: str = "tiny", **model_keys):
    """A resolved CLIP model config: the preset with ``model_keys`` laid over it (sections merge)."""
    return CLIP_SPEC.resolve({"preset": preset, **model_keys})


def build_clip(cfg):
    return CLIP_SPEC.build(cfg)


# A CLIP small enough for quick CPU tests of curation and evaluation.
TINY_CLIP = clip_config(embed_dim=32, vision={"width": 32}, text={"context_length": 16, "width": 32})


def loader_inputs(image_size: int = 16, context_length: int = 8) -> tuple:
    """The image transform and tokenizer a CLIP of this size trains with (what the loader is given)."""
    cfg = clip_config(vision={"image_size": image_size}, text={"context_length": context_length})
    return CLIP_SPEC.image_transform(cfg, True), CLIP_SPEC.tokenizer(cfg)
