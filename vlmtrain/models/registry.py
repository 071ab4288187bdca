"""Model families by name: ``model.family`` in a run config selects one spec."""
from __future__ import annotations

from vlmtrain.errors import ConfigError
from vlmtrain.models.clip.config import migrate_legacy as migrate_legacy_clip
from vlmtrain.models.clip.spec import SPEC as CLIP_SPEC
from vlmtrain.models.flava.spec import SPEC as FLAVA_SPEC
from vlmtrain.models.limoe.spec import SPEC as LIMOE_SPEC
from vlmtrain.models.maskvlm.spec import SPEC as MASKVLM_SPEC
from vlmtrain.models.spec import ModelSpec

FAMILIES: dict[str, ModelSpec] = {
    "clip": CLIP_SPEC,
    "flava": FLAVA_SPEC,
    "maskvlm": MASKVLM_SPEC,
    "limoe": LIMOE_SPEC,
}


def get_spec(family: str, key: str = "model.family") -> ModelSpec:
    if family not in FAMILIES:
        raise ConfigError(f"config key {key!r}: got {family!r}, allowed values: {', '.join(FAMILIES)}")
    return FAMILIES[family]


def spec_of(model_cfg) -> ModelSpec:
    """The spec of a resolved model config (every family's config names its family)."""
    return get_spec(model_cfg.family)


def load_model_config(saved: dict, prefix: str = "model"):
    """A model config that vlm-train wrote whole (an export's, a checkpoint's), old layouts included."""
    if "family" not in saved:  # written before model families existed: always a CLIP
        saved = migrate_legacy_clip(saved)
    return get_spec(saved["family"], f"{prefix}.family").load(saved, prefix)
