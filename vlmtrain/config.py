"""The run configuration of ``vlm-train``: typed dataclasses loaded from YAML plus overrides.

Every key is checked before any process starts: a misspelled key or a bad value raises
``ConfigError`` naming the dotted key, what was given and what is allowed. The ``model:`` section
is the model family's own config (``model.family`` picks it; see ``vlmtrain/models/registry.py``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmtrain.configlib import at_least, between, choices, from_dict, read_yaml_with_overrides
from vlmtrain.distributed.parallel_dims import ParallelDims
from vlmtrain.errors import ConfigError
from vlmtrain.models.registry import get_spec, spec_of


@dataclass
class SourceConfig:
    """One training source: its shards (directory, brace pattern or glob) and its mixing weight."""
    shards: str = field(default="", metadata={"required": True})
    weight: float = field(default=1.0, metadata=at_least(0.0))


@dataclass
class DataConfig:
    """Training data: ``train_shards`` for one source, or ``sources`` to mix several by weight."""
    train_shards: str = ""
    sources: list[SourceConfig] = field(default_factory=list)
    # Draw shards with replacement, endlessly, instead of whole-shard-list epochs.
    resample: bool = False
    batch_size: int = field(default=64, metadata=at_least(1))  # micro-batch per data-parallel rank
    workers: int = field(default=1, metadata=at_least(0))
    shuffle_buffer: int = field(default=1000, metadata=at_least(0))
    # Write the keys of every trained sample to RUN/sample_keys/rank*.jsonl (data audits).
    record_keys: bool = False

    def check(self) -> None:
        if bool(self.train_shards) == bool(self.sources):
            raise ConfigError("give exactly one of data.train_shards (one source) and data.sources "
                              "(a list of {shards, weight})")
        if self.sources and not any(source.weight > 0 for source in self.sources):
            raise ConfigError("data.sources: at least one weight must be > 0")

    def source_list(self) -> list[SourceConfig]:
        return self.sources or [SourceConfig(shards=self.train_shards)]


@dataclass
class OptimConfig:
    lr: float = field(default=1e-3, metadata=between(0.0, 10.0))
    weight_decay: float = field(default=0.1, metadata=at_least(0.0))
    beta1: float = field(default=0.9, metadata=between(0.0, 1.0))
    beta2: float = field(default=0.98, metadata=between(0.0, 1.0))
    eps: float = field(default=1e-6, metadata=between(0.0, 1.0))
    warmup_steps: int = field(default=50, metadata=at_least(0))
    grad_accum_steps: int = field(default=1, metadata=at_least(1))
    # Max global gradient norm; 0 = off. 1.0 is also DeepSpeed's own default, which tiny CLIPs need.
    grad_clip: float = field(default=1.0, metadata=at_least(0.0))
    offload: bool = False  # keep optimizer state and step in CPU memory (ZeRO >= 1)


@dataclass
class CheckpointConfig:
    every: int = field(default=0, metadata=at_least(0))  # steps between saves; 0 = only at the end
    keep: int = field(default=3, metadata=at_least(1))  # newest checkpoints kept on disk


@dataclass
class EvalConfig:
    """Zero-shot evaluation during training (CLIP_benchmark-layout dataset directories)."""
    every: int = field(default=0, metadata=at_least(0))  # steps; 0 = never
    datasets: list[str] = field(default_factory=list)
    batch_size: int = field(default=256, metadata=at_least(1))


@dataclass
class MetricsConfig:
    tensorboard: bool = True
    # Peak FLOP/s of one device, for MFU; 0 = look the GPU up in a table (no MFU on CPU).
    peak_tflops: float = field(default=0.0, metadata=at_least(0.0))


@dataclass
class ParallelConfig:
    """Tensor- and pipeline-parallel degrees; data parallelism takes the remaining ranks. ``ep`` splits
    a mixture of experts' experts over groups of ``ep`` data-parallel ranks."""
    tp: int = field(default=1, metadata=at_least(1))
    pp: int = field(default=1, metadata=at_least(1))
    ep: int = field(default=1, metadata=at_least(1))


@dataclass
class TrainConfig:
    model: Any = field(default_factory=lambda: get_spec("clip").resolve({}))  # the family's config
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # "latest" or a checkpoint directory (RUN/checkpoints/step_0000100) to continue from.
    resume: str = ""
    # Weights to start from: our export (RUN or RUN/final) or a file open_clip saved (.pt/.safetensors).
    init_from: str = ""
    # Start over in an output_dir that holds a run (its contents are deleted first); without it,
    # such a directory is refused unless resume is set.
    overwrite: bool = False
    steps: int = field(default=100, metadata=at_least(1))
    zero_stage: int = field(default=2, metadata=choices(0, 1, 2, 3))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: str = field(default="fp32", metadata=choices("fp32", "bf16"))
    seed: int = 0
    log_every: int = field(default=10, metadata=at_least(1))
    output_dir: str = field(default="runs/demo", metadata={"required": True})
    progress: bool = True

    def check(self) -> None:
        self.data.check()
        if self.optim.warmup_steps > self.steps:
            raise ConfigError(f"optim.warmup_steps={self.optim.warmup_steps} exceeds steps={self.steps}")
        if self.overwrite and self.resume:
            raise ConfigError(f"overwrite=true deletes the run that resume={self.resume} would continue: give one of them")
        if self.optim.offload and self.zero_stage == 0:
            raise ConfigError("optim.offload=true needs zero_stage >= 1 (ZeRO partitions what is offloaded)")
        if self.precision == "bf16" and self.zero_stage == 0:
            # DeepSpeed 0.19's bf16 optimizer without ZeRO cannot reload its checkpoints.
            raise ConfigError("precision=bf16 needs zero_stage >= 1 (DeepSpeed cannot resume bf16 at ZeRO 0)")
        if self.parallel.pp > 1 and self.zero_stage > 1:
            raise ConfigError(f"parallel.pp={self.parallel.pp} needs zero_stage <= 1 (DeepSpeed's pipeline "
                              f"engine shards optimizer states only); set zero_stage=1 or parallel.pp=1")
        if self.parallel.pp > 1 and self.parallel.tp > 1:
            raise ConfigError("parallel.tp and parallel.pp cannot both be > 1 yet: use one of them "
                              "(data parallelism composes with either)")
        spec = spec_of(self.model)
        check_experts(self, spec)
        for key, heads in spec.tp_divisible(self.model).items():
            if heads % self.parallel.tp:
                raise ConfigError(f"parallel.tp={self.parallel.tp} does not divide {key}={heads}: each "
                                  f"tensor-parallel rank holds whole attention heads; pick a tp that divides it")
        if self.parallel.pp > 1:
            if spec.pipeline_layers is None:
                raise ConfigError(f"model.family={spec.family} cannot be pipelined: set parallel.pp=1")
            depth = spec.pipeline_depth(self.model)
            if self.parallel.pp > depth:
                raise ConfigError(f"parallel.pp={self.parallel.pp} stages outnumber the model's {depth} "
                                  f"transformer layers: lower parallel.pp")

    def parallel_dims(self, world_size: int) -> ParallelDims:
        """The validated layout of this run on ``world_size`` ranks."""
        return ParallelDims(world_size, tp=self.parallel.tp, pp=self.parallel.pp, ep=self.parallel.ep)


def check_experts(cfg: TrainConfig, spec) -> None:
    """A mixture of experts on DeepSpeed: ZeRO ≤ 2, experts split evenly over ``parallel.ep``, and (for
    now) no tensor or pipeline parallelism beside it; families without a tensor-parallel plan refuse tp."""
    experts = spec.experts.num_experts(cfg.model) if spec.experts else 0
    ep = cfg.parallel.ep
    if ep > 1 and not experts:
        raise ConfigError(f"parallel.ep={ep} needs a model with experts (model.family=limoe with moe.every >= 1); "
                          f"set parallel.ep=1")
    if experts and cfg.zero_stage == 3:
        raise ConfigError("zero_stage=3 cannot partition DeepSpeed's MoE experts: set zero_stage=1 or 2 "
                          "(ZeRO 1/2 still shard the optimizer states of experts over their data-parallel ranks)")
    if experts % ep:
        raise ConfigError(f"parallel.ep={ep} does not divide model.moe.num_experts={experts}: each expert-parallel "
                          f"rank holds the same number of experts; pick an ep that divides it")
    if ep > 1 and (cfg.parallel.tp > 1 or cfg.parallel.pp > 1):
        raise ConfigError(f"parallel.ep={ep} cannot be combined with parallel.tp or parallel.pp > 1 yet: set them to 1")
    if cfg.parallel.tp > 1 and not (spec.tp_plan.column or spec.tp_plan.row):
        raise ConfigError(f"model.family={spec.family} has no tensor-parallel plan: set parallel.tp=1")


# ---------------------------------------------------------------- loading


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML file (or start from defaults), apply overrides, build and validate."""
    raw = migrate_legacy_keys(read_yaml_with_overrides(path, overrides))
    raw["model"] = get_spec(raw["model"].get("family", "clip")).resolve(raw["model"])
    cfg = from_dict(TrainConfig, raw)
    cfg.check()
    return cfg


def migrate_legacy_keys(raw: dict) -> dict:
    """Keys that moved when model families arrived: ``model.name`` is now ``model.preset`` and the
    top-level ``loss`` is now ``model.loss``. Old configs keep working, with a note."""
    model = raw.get("model")
    if model is not None and not isinstance(model, dict):
        raise ConfigError("model must be a mapping")
    raw, model = dict(raw), dict(model or {})
    moved = []
    if "name" in model and "preset" not in model:
        model["preset"] = model.pop("name")
        moved.append(("model.name", "model.preset"))
    if "loss" in raw:
        model.setdefault("loss", raw.pop("loss"))
        moved.append(("loss", "model.loss"))
    for old, new in moved:
        warnings.warn(f"config key {old!r} is now {new!r}; read as {new}", UserWarning, stacklevel=3)
    return {**raw, "model": model}
