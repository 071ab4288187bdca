"""The LIMoE family as the trainer sees it."""
from __future__ import annotations

import torch

from vlmtrain.models.common.temperature import LOGGED_TEMPERATURE, TEMPERATURE_BOUNDS
from vlmtrain.models.common.vision import openclip_transform
from vlmtrain.models.limoe import parallelize
from vlmtrain.models.limoe.config import PRESETS, LIMoEConfig
from vlmtrain.models.limoe.loss import LIMoEObjective
from vlmtrain.models.limoe.model import LIMoE
from vlmtrain.models.limoe.routing import plot_routing, routing_stats
from vlmtrain.models.spec import ExpertParallelism, ModelSpec


def tokenizer(cfg: LIMoEConfig):
    """open_clip's BPE tokenizer (its vocabulary ships in the wheel: no download)."""
    import open_clip  # lazily: the launcher process reads configs and never needs it

    return open_clip.tokenizer.SimpleTokenizer(context_length=cfg.context_length)


def image_transform(cfg: LIMoEConfig, train: bool):
    return openclip_transform(cfg.image_size, train)


def example_inputs(cfg: LIMoEConfig, batch: int) -> dict[str, torch.Tensor]:
    return {"images": torch.zeros(batch, 3, cfg.image_size, cfg.image_size),
            "tokens": torch.zeros(batch, cfg.context_length, dtype=torch.long)}


SPEC = ModelSpec(
    family="limoe",
    config_cls=LIMoEConfig,
    presets=PRESETS,
    build=LIMoE,
    build_loss=lambda cfg, group: LIMoEObjective(cfg.loss, group),
    tokenizer=tokenizer,
    image_transform=image_transform,
    example_inputs=example_inputs,
    parameter_bounds=TEMPERATURE_BOUNDS,
    logged_parameters=LOGGED_TEMPERATURE,
    no_weight_decay=("logit_scale",),
    experts=ExpertParallelism(parallelize.num_experts, parallelize.build_sharded),
    step_diagnostics=routing_stats,
    plot_run=plot_routing,
)
