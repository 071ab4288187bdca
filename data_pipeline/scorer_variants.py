"""Cheaper, inexact scorers for the embed step: what ``EmbedConfig.precision`` and ``.sparsify`` do to a
loaded model (BENCHMARKS.md "Cheaper scorers" measures their speed and their agreement with the exact one).

  precision fp32   the model as loaded (the default: exact)
            bf16   its forwards under CPU/GPU bfloat16 autocast (matmuls in bf16, features returned as float32
                   by the embed step)
            int8   a copy with every ``nn.Linear`` dynamically quantized to int8 (weights int8 per tensor,
                   activations quantized per batch; ``torch.ao.quantization.quantize_dynamic``; CPU only)
  sparsify         the image tower runs as ``SparsifiedVisionTower`` (vlmtrain/models/common/token_sparsify.py):
                   vlm-train CLIP models only (open_clip's towers have no per-block attention to read)

The embeddings are stamped with the model and ``EmbedConfig.variant()`` (nothing for the default),
so embeddings of another variant are never reused, and those of the default still are.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import replace

import torch
from torch import nn

from data_pipeline.config import EmbedConfig
from vlmtrain.errors import ConfigError
from vlmtrain.eval.checkpoints import EvalModel


class ScorerVariantError(ConfigError):
    """A scorer variant that this model cannot run; names the config key."""


def apply(loaded: EvalModel, cfg: EmbedConfig) -> EvalModel:
    """``loaded`` itself for the exact scorer, otherwise a copy whose model runs the variant."""
    if not cfg.variant():
        return loaded
    model = copy.deepcopy(loaded.model)
    if cfg.sparsify.depths:
        model.visual = _sparsified(model, loaded.name, cfg)
    if cfg.precision == "int8":
        model = _int8(model)
    elif cfg.precision == "bf16":
        model = Autocast(model, torch.bfloat16)
    return replace(loaded, model=model.eval())


def _sparsified(model: nn.Module, name: str, cfg: EmbedConfig) -> nn.Module:
    from vlmtrain.models.common.token_sparsify import SparsifiedVisionTower
    from vlmtrain.models.common.vision import VisionTower

    if not isinstance(getattr(model, "visual", None), VisionTower):
        raise ScorerVariantError(f"embed.sparsify needs a vlm-train CLIP model (its image tower's per-block "
                                 f"attention); {name} has a {type(getattr(model, 'visual', model)).__name__}")
    try:
        return SparsifiedVisionTower(model.visual, cfg.sparsify.depths, cfg.sparsify.keep, cfg.sparsify.fuse)
    except ValueError as err:
        raise ScorerVariantError(f"embed.sparsify.depths={cfg.sparsify.depths} does not fit {name}: {err}") from None


def _int8(model: nn.Module) -> nn.Module:
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ScorerVariantError("embed.precision=int8 runs on CPU only (dynamic quantization has no GPU kernels)")
    with warnings.catch_warnings():  # deprecated in favour of torchao, which this project does not install
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions", category=UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


class Autocast(nn.Module):
    """``encode_image``/``encode_text`` of ``model`` under autocast to ``dtype`` on the inputs' device."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, dtype=self.dtype):
            return self.model.encode_image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast(tokens.device.type, dtype=self.dtype):
            return self.model.encode_text(tokens)
