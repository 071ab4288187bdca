"""The CLIP / SigLIP family as the trainer sees it."""
from __future__ import annotations

import torch

from vlmtrain.models.clip import parallelize
from vlmtrain.models.clip.config import PRESETS, CLIPConfig, loss_defaults
from vlmtrain.models.clip.loss import ContrastiveObjective
from vlmtrain.models.clip.model import CLIP, LOGGED_PARAMETERS, PARAMETER_BOUNDS
from vlmtrain.models.clip.openclip import load_openclip_checkpoint, write_openclip_dir
from vlmtrain.models.common.vision import openclip_transform
from vlmtrain.models.spec import ModelSpec, StateDictAdapter


def tokenizer(cfg: CLIPConfig):
    """open_clip's BPE tokenizer (its vocabulary ships in the wheel: no download)."""
    import open_clip  # here, not at the top: the launcher process reads configs and never needs it

    return open_clip.tokenizer.SimpleTokenizer(context_length=cfg.text.context_length)


def image_transform(cfg: CLIPConfig, train: bool):
    return openclip_transform(cfg.vision.image_size, train)


def example_inputs(cfg: CLIPConfig, batch: int) -> dict[str, torch.Tensor]:
    size = cfg.vision.image_size
    return {"images": torch.zeros(batch, 3, size, size),
            "tokens": torch.zeros(batch, cfg.text.context_length, dtype=torch.long)}


SPEC = ModelSpec(
    family="clip",
    config_cls=CLIPConfig,
    presets=PRESETS,
    build=CLIP,
    build_loss=lambda cfg, group: ContrastiveObjective(cfg.loss, group),
    tokenizer=tokenizer,
    image_transform=image_transform,
    example_inputs=example_inputs,
    implied_defaults=loss_defaults,
    parameter_bounds=PARAMETER_BOUNDS,
    logged_parameters=LOGGED_PARAMETERS,
    no_weight_decay=("logit_scale",),
    tp_plan=parallelize.TP_PLAN,
    tp_divisible=parallelize.tp_divisible,
    pipeline_layers=parallelize.pipeline_layers,
    pipeline_depth=parallelize.pipeline_depth,
    adapter=StateDictAdapter("open_clip", load_openclip_checkpoint, write_openclip_dir),
)
