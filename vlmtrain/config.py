"""Typed run configuration: dataclasses loaded from YAML plus ``key.sub=value`` overrides.

Every key is checked before any process starts: a misspelled key or a bad value raises
``ConfigError`` naming the dotted key, what was given and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message names the offending key."""


def _choices(*allowed: Any) -> dict:
    return {"choices": allowed}


def _at_least(minimum: float) -> dict:
    return {"min": minimum}


def _between(minimum: float, maximum: float) -> dict:
    return {"min": minimum, "max": maximum}


@dataclass
class VisionConfig:
    image_size: int = field(default=32, metadata=_at_least(8))
    patch_size: int = field(default=8, metadata=_at_least(1))
    width: int = field(default=64, metadata=_at_least(8))
    layers: int = field(default=2, metadata=_at_least(1))
    heads: int = field(default=2, metadata=_at_least(1))
    mlp_ratio: float = field(default=4.0, metadata=_at_least(0.25))

    def check(self, prefix: str) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"{prefix}.image_size={self.image_size} is not divisible by "
                              f"{prefix}.patch_size={self.patch_size}")
        _check_heads(prefix, self.width, self.heads)


@dataclass
class TextConfig:
    context_length: int = field(default=32, metadata=_at_least(4))
    vocab_size: int = field(default=49408, metadata=_at_least(2))
    width: int = field(default=64, metadata=_at_least(8))
    layers: int = field(default=2, metadata=_at_least(1))
    heads: int = field(default=2, metadata=_at_least(1))
    mlp_ratio: float = field(default=4.0, metadata=_at_least(0.25))

    def check(self, prefix: str) -> None:
        _check_heads(prefix, self.width, self.heads)


def _check_heads(prefix: str, width: int, heads: int) -> None:
    if width % heads:
        raise ConfigError(f"{prefix}.width={width} is not divisible by {prefix}.heads={heads}")


@dataclass
class ModelConfig:
    """A CLIP model. ``name`` picks a preset from the registry; other keys override it.

    ``init_logit_scale`` is log(1/temperature). ``init_logit_bias`` adds the learnable bias that the
    SigLIP loss needs; ``loss: siglip`` sets both to SigLIP's init (log 10, -10) unless given.
    """
    name: str = "tiny"
    embed_dim: int = field(default=64, metadata=_at_least(1))
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None


@dataclass
class SourceConfig:
    """One training source: its shards (directory, brace pattern or glob) and its mixing weight."""
    shards: str = field(default="", metadata={"required": True})
    weight: float = field(default=1.0, metadata=_at_least(0.0))


@dataclass
class DataConfig:
    """Training data: ``train_shards`` for one source, or ``sources`` to mix several by weight."""
    train_shards: str = ""
    sources: list[SourceConfig] = field(default_factory=list)
    # Draw shards with replacement, endlessly, instead of whole-shard-list epochs.
    resample: bool = False
    batch_size: int = field(default=64, metadata=_at_least(1))  # micro-batch per data-parallel rank
    workers: int = field(default=1, metadata=_at_least(0))
    shuffle_buffer: int = field(default=1000, metadata=_at_least(0))
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
    lr: float = field(default=1e-3, metadata=_between(0.0, 10.0))
    weight_decay: float = field(default=0.1, metadata=_at_least(0.0))
    beta1: float = field(default=0.9, metadata=_between(0.0, 1.0))
    beta2: float = field(default=0.98, metadata=_between(0.0, 1.0))
    eps: float = field(default=1e-6, metadata=_between(0.0, 1.0))
    warmup_steps: int = field(default=50, metadata=_at_least(0))
    grad_accum_steps: int = field(default=1, metadata=_at_least(1))
    # Max global gradient norm; 0 = off. 1.0 is also DeepSpeed's own default, which tiny CLIPs need.
    grad_clip: float = field(default=1.0, metadata=_at_least(0.0))
    offload: bool = False  # keep optimizer state and step in CPU memory (ZeRO >= 1)


@dataclass
class CheckpointConfig:
    every: int = field(default=0, metadata=_at_least(0))  # steps between saves; 0 = only at the end
    keep: int = field(default=3, metadata=_at_least(1))  # newest checkpoints kept on disk


@dataclass
class EvalConfig:
    """Zero-shot evaluation during training (CLIP_benchmark-layout dataset directories)."""
    every: int = field(default=0, metadata=_at_least(0))  # steps; 0 = never
    datasets: list[str] = field(default_factory=list)
    batch_size: int = field(default=256, metadata=_at_least(1))


@dataclass
class MetricsConfig:
    tensorboard: bool = True
    # Peak FLOP/s of one device, for MFU; 0 = look the GPU up in a table (no MFU on CPU).
    peak_tflops: float = field(default=0.0, metadata=_at_least(0.0))


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: str = field(default="clip", metadata=_choices("clip", "siglip"))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # "latest" or a checkpoint directory (RUN/checkpoints/step_0000100) to continue from.
    resume: str = ""
    # Weights to start from: our export (RUN or RUN/final) or a file open_clip saved (.pt/.safetensors).
    init_from: str = ""
    steps: int = field(default=100, metadata=_at_least(1))
    zero_stage: int = field(default=2, metadata=_choices(0, 1, 2, 3))
    precision: str = field(default="fp32", metadata=_choices("fp32", "bf16"))
    seed: int = 0
    log_every: int = field(default=10, metadata=_at_least(1))
    output_dir: str = field(default="runs/demo", metadata={"required": True})
    progress: bool = True

    def check(self) -> None:
        self.model.vision.check("model.vision")
        self.model.text.check("model.text")
        self.data.check()
        if self.optim.warmup_steps > self.steps:
            raise ConfigError(f"optim.warmup_steps={self.optim.warmup_steps} exceeds steps={self.steps}")
        if self.loss == "siglip" and self.model.init_logit_bias is None:
            raise ConfigError("loss=siglip needs model.init_logit_bias (SigLIP's learnable bias)")
        if self.loss == "clip" and self.model.init_logit_bias is not None:
            raise ConfigError("model.init_logit_bias is only used by loss=siglip; remove it for loss=clip")
        if self.optim.offload and self.zero_stage == 0:
            raise ConfigError("optim.offload=true needs zero_stage >= 1 (ZeRO partitions what is offloaded)")
        if self.precision == "bf16" and self.zero_stage == 0:
            # DeepSpeed 0.19's bf16 optimizer without ZeRO cannot reload its checkpoints.
            raise ConfigError("precision=bf16 needs zero_stage >= 1 (DeepSpeed cannot resume bf16 at ZeRO 0)")


# ---------------------------------------------------------------- loading


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML file (or start from defaults), apply overrides, build and validate."""
    raw = _resolve_model_preset(read_yaml_with_overrides(path, overrides))
    _apply_loss_defaults(raw)
    cfg = from_dict(TrainConfig, raw)
    cfg.check()
    return cfg


def read_yaml_with_overrides(path: str | Path | None, overrides: Sequence[str] = (), what: str = "config file") -> dict:
    """The mapping in a YAML file (empty without one) with ``key.sub=value`` overrides applied."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{what} not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{what} {path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{what} {path} must hold a mapping at the top level")
    for item in overrides:
        apply_override(raw, item)
    return raw


def apply_override(raw: dict, item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (so 1e-3, true, [1,2]), unless
    YAML would drop part of the text (``output_dir=/runs/exp #2`` reads as ``/runs/exp``: a comment):
    then the whole text is the value, a string, which a key of another type refuses."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    try:
        parsed = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        parsed = None  # not YAML at all (an unbalanced quote or bracket): the text as it is
    whole = parsed is not None and parsed.end_mark.index >= len(text.rstrip())
    node[leaf] = yaml.safe_load(text) if whole else text


def _resolve_model_preset(raw: dict) -> dict:
    """Expand ``model.name`` into the preset's fields, then lay the user's keys over them."""
    from vlmtrain.models.registry import preset_dict

    model = raw.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError("model must be a mapping")
    name = model.get("name", ModelConfig.name)
    resolved = dict(raw)
    resolved["model"] = _deep_merge(preset_dict(name), model)
    return resolved


SIGLIP_INIT = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}


def _apply_loss_defaults(raw: dict) -> None:
    """``loss: siglip`` alone is enough: the model gets SigLIP's init unless the user set it."""
    if raw.get("loss") == "siglip":
        for key, value in SIGLIP_INIT.items():
            raw["model"].setdefault(key, value)


def _deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, naming the dotted key of any mistake."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {_join(prefix, close[0])!r}?)" if close else ""
            raise ConfigError(f"unknown config key {_join(prefix, key)!r}{hint}; "
                              f"allowed keys here: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        dotted = _join(prefix, name)
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], dotted)
            _check_bounds(f, values[name], dotted)
        elif dataclasses.is_dataclass(hints[name]):
            values[name] = from_dict(hints[name], {}, dotted)
        if f.metadata.get("required") and not values.get(name, f.default):
            raise ConfigError(f"config key {dotted!r} is required")
    return cls(**values)


def _coerce(kind: Any, value: Any, dotted: str) -> Any:
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, dotted)
    if isinstance(kind, types.UnionType):
        if value is None and type(None) in typing.get_args(kind):
            return None
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if typing.get_origin(kind) is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {dotted!r} must be a list, got {value!r}")
        (item_kind,) = typing.get_args(kind)
        return [_coerce(item_kind, item, f"{dotted}[{i}]") for i, item in enumerate(value)]
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"config key {dotted!r} must be {kind.__name__}, got {value!r}")


def _check_bounds(f: dataclasses.Field, value: Any, dotted: str) -> None:
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(str(c) for c in meta["choices"])
        raise ConfigError(f"config key {dotted!r}: got {value!r}, allowed values: {allowed}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"config key {dotted!r}: got {value!r}, must be >= {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"config key {dotted!r}: got {value!r}, must be <= {meta['max']}")


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
