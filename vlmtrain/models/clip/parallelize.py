"""How CLIP is split across ranks: its tensor-parallel plan and its pipeline layers.

The pipeline runs both towers one after the other. Each layer takes and returns a tuple of tensors
(what a DeepSpeed pipeline stage sends to the next); the token ids ride along for the text
tower's EOT pooling (integer tensors get no gradient)::

    (images, tokens) → image embed → vision blocks → image pool → (image_features, tokens)
    → text embed → text blocks (causal) → text pool → (image_features, text_features) → head

Each layer holds a built CLIP's own submodules and parameters under the names they have there and
runs the tower's own method on them (``VisionTower.embed(self, …)``), so the computation is the
model's and every weight can be named back to its CLIP key. The head's output (normalized features,
logit scale and bias) goes to the loss on the last stage, one micro-batch at a time: a
micro-batch's negatives are its own samples, gathered over the data-parallel group, as in a
non-pipelined step of the same micro-batch size.
"""
from __future__ import annotations

import torch
from torch import nn

from vlmtrain.models.clip.config import CLIPConfig
from vlmtrain.models.clip.model import CLIP
from vlmtrain.models.common.blocks import Block
from vlmtrain.models.common.text import TextTower
from vlmtrain.models.common.vision import VisionTower
from vlmtrain.models.spec import TensorParallelPlan

# Every block of both towers: q/k/v and the MLP's up projection split by output features (each rank
# holds heads/tp heads and hidden/tp units), out and down projections by input features (their
# partial sums are all-reduced).
TP_PLAN = TensorParallelPlan(
    column=(r".*\.attn\.q_proj\.weight$", r".*\.attn\.k_proj\.weight$", r".*\.attn\.v_proj\.weight$",
            r".*\.mlp\.up_proj\.weight$"),
    row=(r".*\.attn\.out_proj\.weight$", r".*\.mlp\.down_proj\.weight$"),
)


def tp_divisible(cfg: CLIPConfig) -> dict[str, int]:
    """Each tensor-parallel rank holds whole attention heads."""
    return {"model.vision.heads": cfg.vision.heads, "model.text.heads": cfg.text.heads}


def pipeline_depth(cfg: CLIPConfig) -> int:
    """Transformer blocks of both towers, which a pipeline's stages share out."""
    return cfg.vision.layers + cfg.text.layers


class _Part(nn.Module):
    """Some of a built module's parameters and submodules, registered under their names there."""

    def __init__(self, source: nn.Module, names: tuple[str, ...]):
        super().__init__()
        for name in names:
            setattr(self, name, getattr(source, name))


class ImageEmbed(_Part):
    def __init__(self, tower: VisionTower):
        super().__init__(tower, ("patch_embed", "class_embedding", "positional_embedding", "ln_pre",
                                 "patch_dropout"))

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images, tokens = inputs
        return VisionTower.embed(self, images), tokens


class ImageBlock(nn.Module):
    def __init__(self, block: Block):
        super().__init__()
        self.block = block

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, tokens = inputs
        return self.block(x), tokens


class ImagePool(_Part):
    def __init__(self, tower: VisionTower):
        super().__init__(tower, ("ln_post", "proj"))

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, tokens = inputs
        return VisionTower.pool(self, x), tokens


class TextEmbed(_Part):
    def __init__(self, tower: TextTower):
        super().__init__(tower, ("token_embedding", "positional_embedding"))

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        image_features, tokens = inputs
        return image_features, TextTower.embed(self, tokens), tokens


class TextBlock(nn.Module):
    def __init__(self, block: Block):
        super().__init__()
        self.block = block

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        image_features, x, tokens = inputs
        return image_features, self.block(x, causal=True), tokens


class TextPool(_Part):
    def __init__(self, tower: TextTower):
        super().__init__(tower, ("ln_final", "proj"))

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        image_features, x, tokens = inputs
        return image_features, TextTower.pool(self, x, tokens)


class Head(_Part):
    def __init__(self, model: CLIP):
        super().__init__(model, ("logit_scale", "logit_bias"))

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        return CLIP.head(self, *inputs)


def pipeline_layers(model: CLIP) -> list[nn.Module]:
    """The layers of a pipelined CLIP, in order; the stages share out the ``*Block`` layers evenly."""
    return [ImageEmbed(model.visual), *map(ImageBlock, model.visual.transformer.blocks), ImagePool(model.visual),
            TextEmbed(model.text), *map(TextBlock, model.text.transformer.blocks), TextPool(model.text),
            Head(model)]
