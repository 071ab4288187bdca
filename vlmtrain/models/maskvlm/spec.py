"""The MaskVLM family as the trainer sees it."""
from __future__ import annotations

import torch

from vlmtrain.models.common.masking import EOT_ID, SOT_ID, mask_text, masking_tokenizer, random_mask
from vlmtrain.models.common.temperature import LOGGED_TEMPERATURE, TEMPERATURE_BOUNDS
from vlmtrain.models.common.vision import openclip_transform
from vlmtrain.models.maskvlm import parallelize
from vlmtrain.models.maskvlm.config import PRESETS, MaskVLMConfig
from vlmtrain.models.maskvlm.loss import MaskVLMObjective
from vlmtrain.models.maskvlm.model import MaskVLM
from vlmtrain.models.spec import ModelSpec


def image_transform(cfg: MaskVLMConfig, train: bool):
    """open_clip's transforms (OpenAI mean/std): the MIM targets are these normalized pixels."""
    return openclip_transform(cfg.vision.image_size, train)


def block_image_mask(cfg: MaskVLMConfig) -> torch.Tensor:
    """[N] bool: ``mim_ratio`` of the square ``mim_block_patches``-sided blocks tiling the patch grid,
    chosen uniformly (SimMIM's block-wise masking; 32×32 px blocks at 224 px, scaled)."""
    side = cfg.mim_block_patches
    blocks = cfg.vision.image_size // cfg.vision.patch_size // side
    coarse = random_mask(blocks * blocks, cfg.mim_ratio).reshape(blocks, blocks)
    return coarse.repeat_interleave(side, dim=0).repeat_interleave(side, dim=1).flatten()


def sample_inputs(cfg: MaskVLMConfig):
    """Per sample, in the loader worker (seeded by the sample's position): the image's block mask and
    the BERT-masked caption with its labels."""
    def inputs(image: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        mlm_tokens, mlm_labels = mask_text(tokens, cfg.mlm_ratio, vocab_size=cfg.text.vocab_size)
        return {"image_mask": block_image_mask(cfg), "mlm_tokens": mlm_tokens, "mlm_labels": mlm_labels}
    return inputs


def example_inputs(cfg: MaskVLMConfig, batch: int) -> dict[str, torch.Tensor]:
    size, context = cfg.vision.image_size, cfg.text.context_length
    image_mask = torch.zeros(batch, cfg.num_patches, dtype=torch.bool)
    image_mask[:, :cfg.mim_masked_patches] = True
    mlm_labels = torch.full((batch, context), -100, dtype=torch.long)
    mlm_labels[:, 1:1 + cfg.mlm_slots] = 1
    tokens = torch.zeros(batch, context, dtype=torch.long)
    tokens[:, :2] = torch.tensor([SOT_ID, EOT_ID])
    return {"images": torch.zeros(batch, 3, size, size), "tokens": tokens,
            "image_mask": image_mask, "mlm_tokens": torch.zeros(batch, context, dtype=torch.long),
            "mlm_labels": mlm_labels}


SPEC = ModelSpec(
    family="maskvlm",
    config_cls=MaskVLMConfig,
    presets=PRESETS,
    build=MaskVLM,
    build_loss=MaskVLMObjective,
    tokenizer=lambda cfg: masking_tokenizer(cfg.text.context_length),
    image_transform=image_transform,
    example_inputs=example_inputs,
    sample_inputs=sample_inputs,
    parameter_bounds=TEMPERATURE_BOUNDS,
    logged_parameters=LOGGED_TEMPERATURE,
    no_weight_decay=("logit_scale",),
    tp_plan=parallelize.TP_PLAN,
    tp_divisible=parallelize.tp_divisible,
)
