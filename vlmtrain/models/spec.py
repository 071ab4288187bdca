"""What a model family tells the trainer, the loader, the checkpoints and the evaluation.

One ``ModelSpec`` per family (torchtitan's pattern): everything family-specific is reached through
it, so the engine, metrics, loader, checkpoint, export and eval code name no family.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.distributed import ProcessGroup

from vlmtrain.configlib import deep_merge, from_dict
from vlmtrain.errors import ConfigError


@dataclass(frozen=True)
class TensorParallelPlan:
    """Which ``nn.Linear`` weights are split by output (column) and by input (row), as regexes over
    parameter names: q/k/v and MLP up projections are column-parallel, out and down row-parallel."""
    column: tuple[str, ...] = ()
    row: tuple[str, ...] = ()


@dataclass(frozen=True)
class StateDictAdapter:
    """Conversion to and from another library's layout (open_clip's, for CLIP): files it reads and writes."""
    name: str
    load_file: Callable[[str, Any], dict[str, torch.Tensor]]  # (path, model cfg) → our state dict
    write_dir: Callable[[dict[str, torch.Tensor], Any, Any], Any]  # (our state, model cfg, folder)


@dataclass(frozen=True)
class ExpertParallelism:
    """A mixture-of-experts family's experts, split over the ``parallel.ep`` ranks of an expert group."""
    num_experts: Callable[[Any], int]  # (model cfg) → experts per MoE layer; 0 for a model without any
    build_sharded: Callable[[Any, int, int], nn.Module]  # (model cfg, ep, ep rank) → this rank's model


@dataclass(frozen=True)
class ModelSpec:
    family: str
    config_cls: type  # a dataclass with ``family`` and ``preset`` fields; its fields are the ``model:`` schema
    presets: Mapping[str, dict]
    build: Callable[[Any], nn.Module]
    # (model cfg, data-parallel group) → a module taking the model's output dict and returning the
    # named loss terms plus their weighted sum under "loss"; every term is logged.
    build_loss: Callable[[Any, ProcessGroup | None], nn.Module]
    tokenizer: Callable[[Any], Callable[[list[str]], torch.Tensor]]
    image_transform: Callable[[Any, bool], Callable]  # (model cfg, train) → PIL image → tensor
    # (model cfg, batch size) → the keyword inputs of one forward, made on the current default device
    # (the meta device for FLOP counts and memory plans): images, tokens and any ``sample_inputs`` extras.
    example_inputs: Callable[[Any, int], dict[str, torch.Tensor]]
    # (model cfg) → a per-sample function (image tensor, token ids) → extra named tensors (masks, masked
    # tokens, labels…), run in the loader worker right after the image transform while torch's global
    # RNG is seeded by the sample's position (so they are a pure function of seed and position). They
    # are batched into ``Batch.extras`` and reach the model as keyword arguments of its forward.
    sample_inputs: Callable[[Any], Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]] | None = None
    # Defaults implied by other keys the user set (e.g. SigLIP's init for loss=siglip).
    implied_defaults: Callable[[dict], dict] = lambda raw: {}
    # Parameters clamped after every optimizer step, and parameters logged, by name (any prefix).
    parameter_bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    logged_parameters: Mapping[str, Callable[[float], float]] = field(default_factory=dict)
    # Names of parameters that get no weight decay beyond norms, biases and embeddings.
    no_weight_decay: tuple[str, ...] = ()
    tp_plan: TensorParallelPlan = TensorParallelPlan()
    # (model cfg) → head counts that tensor parallelism must divide, by dotted config key.
    tp_divisible: Callable[[Any], Mapping[str, int]] = lambda cfg: {}
    # (built model) → the pipeline's layer list, or None when the family cannot be pipelined. The layers
    # hold the model's own modules (so weights keep their names) and pass tuples of tensors; stages get
    # equal numbers of the layers whose class name ends in "Block" (see distributed/pipeline.py).
    pipeline_layers: Callable[[nn.Module], list] | None = None
    # (model cfg) → how many layers a pipeline can split (stages must not outnumber them).
    pipeline_depth: Callable[[Any], int] = lambda cfg: 1
    adapter: StateDictAdapter | None = None
    experts: ExpertParallelism | None = None
    # (training module) → scalars added to each log record (collective: every rank calls it at every
    # log step), e.g. a mixture of experts' routing statistics.
    step_diagnostics: Callable[[nn.Module], dict[str, float]] | None = None
    # (run directory) → figures drawn from its metrics at the end of a run (rank 0).
    plot_run: Callable[[Any], None] | None = None

    def resolve(self, raw: Mapping, prefix: str = "model") -> Any:
        """The model config for a ``model:`` section: its preset's values, then what other keys imply,
        then the keys the user gave; validated."""
        preset = raw.get("preset", self.config_cls.preset)
        if preset not in self.presets:
            raise ConfigError(f"config key '{prefix}.preset': got {preset!r}, allowed values for "
                              f"family {self.family!r}: {', '.join(self.presets)}")
        merged = deep_merge(deep_merge(self.presets[preset], self.implied_defaults(raw)), dict(raw))
        cfg = from_dict(self.config_cls, {**merged, "preset": preset}, prefix)
        cfg.check(prefix)
        return cfg

    def load(self, saved: Mapping, prefix: str = "model") -> Any:
        """A model config written out whole (an export's or a checkpoint's): no presets applied."""
        cfg = from_dict(self.config_cls, dict(saved), prefix)
        cfg.check(prefix)
        return cfg
