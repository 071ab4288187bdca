"""The FLAVA family as the trainer sees it."""
from __future__ import annotations

import functools

import torch

from vlmtrain.models.common import masking
from vlmtrain.models.common.temperature import LOGGED_TEMPERATURE, TEMPERATURE_BOUNDS
from vlmtrain.models.common.vision import openclip_transform
from vlmtrain.models.flava import parallelize
from vlmtrain.models.flava.config import PRESETS, FLAVAConfig
from vlmtrain.models.flava.loss import FlavaObjective
from vlmtrain.models.flava.model import FLAVA
from vlmtrain.models.spec import ModelSpec


def mlm_slots(cfg: FLAVAConfig) -> int:
    """Room for each caption's masked tokens: the most ``mask_text`` masks in a full context (all but
    SOT and EOT maskable)."""
    return max(1, masking.masked_count(cfg.text.context_length - 2, cfg.mlm_prob))


def tokenizer(cfg: FLAVAConfig):
    """open_clip's BPE tokenizer plus the [MASK] id (``masking.masking_tokenizer``)."""
    return masking.masking_tokenizer(cfg.text.context_length)


def image_transform(cfg: FLAVAConfig, train: bool):
    return openclip_transform(cfg.vision.image_size, train)


def masks(cfg: FLAVAConfig, image: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """One sample's masks, drawn in the loader worker: the masked patches (BEiT blocks), the BERT-masked
    caption, and its masked positions and original ids in ``mlm_slots`` slots (-100: an empty slot), so
    every tensor of a batch has a fixed shape."""
    grid = cfg.vision.image_size // cfg.vision.patch_size
    patch_mask = masking.block_mask(grid, grid, cfg.mim_count(), cfg.mim_min_block)
    masked, labels = masking.mask_text(tokens, cfg.mlm_prob)
    positions = torch.nonzero(labels >= 0).flatten()
    slots = torch.zeros(mlm_slots(cfg), dtype=torch.long)
    slot_labels = torch.full((mlm_slots(cfg),), -100, dtype=torch.long)
    slots[: len(positions)], slot_labels[: len(positions)] = positions, labels[positions]
    return {"mim_positions": torch.nonzero(patch_mask.flatten()).flatten(), "mlm_tokens": masked,
            "mlm_positions": slots, "mlm_labels": slot_labels}


def example_inputs(cfg: FLAVAConfig, batch: int) -> dict[str, torch.Tensor]:
    size, context = cfg.vision.image_size, cfg.text.context_length
    return {"images": torch.zeros(batch, 3, size, size),
            "tokens": torch.zeros(batch, context, dtype=torch.long),
            "mim_positions": torch.arange(cfg.mim_count()).expand(batch, -1),
            "mlm_tokens": torch.zeros(batch, context, dtype=torch.long),
            "mlm_positions": torch.arange(mlm_slots(cfg)).expand(batch, -1),
            "mlm_labels": torch.zeros(batch, mlm_slots(cfg), dtype=torch.long)}


SPEC = ModelSpec(
    family="flava",
    config_cls=FLAVAConfig,
    presets=PRESETS,
    build=FLAVA,
    build_loss=FlavaObjective,
    tokenizer=tokenizer,
    image_transform=image_transform,
    example_inputs=example_inputs,
    sample_inputs=lambda cfg: functools.partial(masks, cfg),
    parameter_bounds=TEMPERATURE_BOUNDS,
    logged_parameters=LOGGED_TEMPERATURE,
    tp_plan=parallelize.TP_PLAN,
    tp_divisible=parallelize.tp_divisible,
)
