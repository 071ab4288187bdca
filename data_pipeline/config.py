"""Typed curation configuration: dataclasses loaded from YAML plus ``key.sub=value`` overrides.

The generic loading (``from_dict``, ``apply_override``, ``ConfigError``) is vlmtrain's, so both
halves of the project validate keys the same way and name the offending key. The stage sections
(``decode``, ``heuristics``, ``dedup``, ``embedding.clip_score``, ...) are not spelled out here:
each is the dataclass its stage declares in the registry (``data_pipeline.registry``), which lists
it next to the stage's function, so ``CurateConfig`` and ``EmbeddingConfig`` are built from it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import Field, dataclass, field, make_dataclass
from pathlib import Path

from data_pipeline import registry
from data_pipeline.stages.clip_score import ClipScoreConfig
from vlmtrain.configlib import from_dict, read_yaml_with_overrides, to_dict
from vlmtrain.errors import ConfigError

SOURCE_FORMATS = ("webdataset", "parquet", "jsonl")


@dataclass
class SourceConfig:
    """One input. ``path``: a directory, a file or a glob (webdataset ``*.tar``, img2dataset ``*.parquet``,
    ``*.jsonl``). jsonl/parquet rows name their image relative to ``image_root`` (default: the jsonl's
    folder); a path that leads outside it (absolute, ``..``, a symlink out) or to anything but a regular
    file is a rejection reason, never read."""
    format: str = field(default="webdataset", metadata={"choices": SOURCE_FORMATS})
    path: str = field(default="", metadata={"required": True})
    name: str = ""  # label in decisions.parquet; default "<format>:<path>"
    image_root: str = ""
    image_column: str = "image"  # parquet column with image bytes, or jsonl/parquet field with a path
    caption_column: str = "caption"
    url_column: str = "url"
    # Larger tar members or jsonl lines / image files are rejected unread (tar_member_too_large,
    # jsonl_line_too_large / image_file_too_large), so one hostile sample cannot exhaust a worker's memory.
    max_member_bytes: int = field(default=128 << 20, metadata={"min": 1})
    max_file_bytes: int = field(default=128 << 20, metadata={"min": 1})

    def label(self) -> str:
        return self.name or f"{self.format}:{self.path}"


@dataclass
class OutputConfig:
    samples_per_shard: int = field(default=1000, metadata={"min": 1})
    # Rows the driver reads, decides and writes at a time (row groups of the parts and of
    # decisions.parquet): without embedding stages its memory is bounded by this, not by the pool.
    stream_rows: int = field(default=65536, metadata={"min": 1})


@dataclass
class RayConfig:
    workers: int = field(default=2, metadata={"min": 1})  # the run's Ray worker processes, for every step
    # Fractional CPUs per worker: the pool lives as long as the run, and the embed step's model workers
    # must still fit beside it on a small machine (whole CPUs on 2 cores: a silent deadlock).
    cpus_per_worker: float = field(default=0.5, metadata={"min": 0.01})
    num_cpus: int = field(default=0, metadata={"min": 0})  # local Ray only; 0 = all cores


# ------------------------------------------------------------------ the CLIP model of the embed step


SCORER_PRECISIONS = ("fp32", "bf16", "int8")


@dataclass
class SparsifyConfig:
    """Training-free token sparsification of the scorer's image tower (EViT-style; see
    vlmtrain/models/common/token_sparsify.py): in each block of ``depths`` (0-based) only the class
    token and the ``keep`` fraction of the other tokens it attends to most go on. No depths: dense."""
    depths: list[int] = field(default_factory=list)
    keep: float = field(default=0.7, metadata={"min": 0.01, "max": 1.0})
    fuse: bool = True  # the dropped tokens go on as one token, their class-attention-weighted sum (EViT)

    def check(self, prefix: str) -> None:
        if any(d < 0 for d in self.depths) or len(set(self.depths)) != len(self.depths):
            raise ConfigError(f"config key '{prefix}.depths': got {self.depths}, must be distinct block "
                              "indices >= 0 (e.g. [1, 2, 3])")


@dataclass
class EmbedConfig:
    """How the embed step's model workers run a CLIP model over the pool. The model itself (a vlm-train
    checkpoint, or an open_clip model with a local weights file) is ``ModelSpec`` (below): given on
    the ``vlm-curate embed`` command line, as ``embedding.model`` of a curation run, or each bootstrap
    round's scorer (the round before it). ``precision`` and ``sparsify`` make a cheaper, inexact
    scorer (data_pipeline/scorer_variants.py; measured in BENCHMARKS.md "Cheaper scorers"); the
    defaults (fp32, no sparsification) are exact."""
    batch_size: int = field(default=256, metadata={"min": 1})  # images per forward
    workers: int = field(default=2, metadata={"min": 1})  # model actors
    # Fractional CPUs, as for the run's workers: the model actors share the machine with them, and
    # whole-CPU actors would not fit beside them on 2 cores.
    cpus_per_worker: float = field(default=0.5, metadata={"min": 0.01})
    threads_per_worker: int = field(default=1, metadata={"min": 1})  # torch threads inside one actor
    num_cpus: int = field(default=0, metadata={"min": 0})  # local Ray only; 0 = all cores
    progress: bool = True
    precision: str = field(default="fp32", metadata={"choices": SCORER_PRECISIONS})  # int8: CPU only
    sparsify: SparsifyConfig = field(default_factory=SparsifyConfig)

    def check(self, prefix: str) -> None:
        self.sparsify.check(f"{prefix}.sparsify")

    def variant(self) -> dict:
        """The scorer variant, as the embeddings' stamp records it: {} for the exact (default) scorer."""
        if self.precision == "fp32" and not self.sparsify.depths:
            return {}
        return {"precision": self.precision, "sparsify": to_dict(self.sparsify) if self.sparsify.depths else None}


@dataclass(frozen=True)
class ModelSpec:
    """The CLIP model of the embed step (what ``vlmtrain.eval.checkpoints.load_eval_model`` needs): a
    vlm-train run/export, or an open_clip model with a local weights file."""
    checkpoint: str = ""
    open_clip_model: str = ""
    pretrained: str = ""
    # Unpickle the checkpoint's DeepSpeed files fully (can run code): only for checkpoints you wrote.
    trust_checkpoint: bool = False

    def is_set(self) -> bool:
        return bool(self.checkpoint or self.open_clip_model)

    def load(self):
        from vlmtrain.eval.checkpoints import load_eval_model

        if self.checkpoint:
            return load_eval_model(self.checkpoint, trust_checkpoint=self.trust_checkpoint)
        return load_eval_model(model=self.open_clip_model, pretrained=self.pretrained or None)

    def describe(self) -> dict:
        """Which model it is (what embeddings are stamped with); how it is loaded is left out."""
        return {"checkpoint": self.checkpoint, "open_clip_model": self.open_clip_model,
                "pretrained": self.pretrained}


# ------------------------------------------------------------------ the configs built from the registry


def stage_sections(parent: str) -> list[tuple[str, type, Field]]:
    """(key, dataclass, field) of every config section the registry's stages declare directly under ``parent``
    ("" for the top level), in stage order; stages that share a section (exact and near dedup) share its type."""
    sections: dict[str, type] = {}
    for stage in registry.STAGES:
        where, _, key = stage.section.rpartition(".")
        if where == parent and sections.setdefault(key, stage.config) is not stage.config:
            raise TypeError(f"stages of section {stage.section!r} declare different configs")
    return [(key, config, field(default_factory=config)) for key, config in sections.items()]


class _EmbeddingChecks:
    """The embed step (``model``, ``embed``) and the embedding stages over its embeddings; all off by default.
    Each stage's section is its dataclass (configs/curate/embedding_stages.yaml documents every key)."""

    def enabled_stages(self) -> list[str]:
        """Enabled stage names, in the order the selection applies them."""
        return [stage.name for stage in registry.of_kind(registry.EMBEDDING)
                if getattr(self, stage.section.rpartition(".")[2]).enabled]

    def check(self) -> None:
        self.embed.check("embedding.embed")
        stages = self.enabled_stages()
        if stages and not self.model.is_set():
            raise ConfigError(f"embedding.{stages[0]} is enabled but 'embedding.model' names no model: set "
                              "embedding.model.checkpoint (a vlm-train run) or embedding.model.open_clip_model "
                              "(+ embedding.model.pretrained, a local weights file)")
        if self.model.checkpoint and self.model.open_clip_model:
            raise ConfigError("'embedding.model' takes checkpoint or open_clip_model, not both")
        _check_sections(self, "embedding")


EmbeddingConfig = make_dataclass("EmbeddingConfig", [
    ("model", ModelSpec, field(default_factory=ModelSpec)),
    ("embed", EmbedConfig, field(default_factory=EmbedConfig)),
    *stage_sections("embedding"),
], bases=(_EmbeddingChecks,), namespace={"__doc__": _EmbeddingChecks.__doc__, "__module__": __name__})


class _CurateChecks:
    """A ``vlm-curate run``: its sources, output, Ray and one section per stage."""

    def check(self) -> None:
        if not self.sources:
            raise ConfigError("config key 'sources' needs at least one source "
                              "(e.g. sources=[{format: webdataset, path: data/train}])")
        for i, source in enumerate(self.sources):
            if not source.path:
                raise ConfigError(f"config key 'sources[{i}].path' is required")
        _check_sections(self, "")
        self.embedding.check()

    def stage_fingerprint(self) -> str:
        """Hash of everything that changes the scored parts and the global stages' verdicts: a resumed run must
        match it. ``embedding`` is left out: its embeddings are stamped with their model, its selection is redone
        every write, so changing it never re-scores the pool. So is ``output_dir``: a run moved, spelled
        another way or continued elsewhere (a bootstrap round starts from its pool's parts) scores the same."""
        stages = {k: v for k, v in to_dict(self).items()
                  if k not in ("output_dir", "ray", "progress", "output", "embedding")}
        return hashlib.sha256(json.dumps(stages, sort_keys=True).encode()).hexdigest()[:16]


CurateConfig = make_dataclass("CurateConfig", [
    ("sources", list[SourceConfig], field(default_factory=list)),
    ("output_dir", str, field(default="", metadata={"required": True})),
    *stage_sections(""),
    ("output", OutputConfig, field(default_factory=OutputConfig)),
    ("ray", RayConfig, field(default_factory=RayConfig)),
    ("batch_rows", int, field(default=256, metadata={"min": 1})),  # rows per stage call inside a worker
    ("progress", bool, field(default=True)),
    ("embedding", EmbeddingConfig, field(default_factory=EmbeddingConfig)),
], bases=(_CurateChecks,), namespace={"__doc__": _CurateChecks.__doc__, "__module__": __name__})


def _check_sections(cfg, parent: str) -> None:
    """Each stage section's own check (one that has it), naming its key."""
    for key, config, _ in stage_sections(parent):
        if hasattr(config, "check"):
            getattr(cfg, key).check(f"{parent}.{key}" if parent else key)


def load_curate_config(path: str | Path | None, overrides: list[str] = ()) -> CurateConfig:
    """Read a YAML file (or start from defaults), apply overrides, build and validate."""
    raw = read_yaml_with_overrides(path, overrides)
    cfg = from_dict(CurateConfig, raw)
    cfg.check()
    return cfg


# ------------------------------------------------------------------ bootstrapping


@dataclass
class BootstrapConfig:
    """``vlm-curate bootstrap``: round 0 trains a scorer on ``pool`` (a finished ``vlm-curate run``);
    round k runs the pool's curation again with round k−1's model as ``embedding.model``, ``embed`` as
    ``embedding.embed`` and ``clip_score`` as the CLIP-score stage, and trains on its shards."""
    pool: str = field(default="", metadata={"required": True})  # output_dir of a finished vlm-curate run
    output_dir: str = field(default="", metadata={"required": True})
    # A finished vlm-train run to use as round 0 instead of training it: it must have trained on the
    # pool's shards with train_config, train_overrides and nproc (checked; a mismatch is refused).
    round0_run: str = ""
    train_config: str = "configs/train/demo.yaml"
    train_overrides: list[str] = field(default_factory=list)  # key=value for vlm-train, every round
    nproc: int = field(default=1, metadata={"min": 1})  # vlm-train ranks
    eval_sets: list[str] = field(default_factory=list)  # vlm-eval --data, after every round
    # index.parquet with `key` and `noise` (tools/make_demo_data.py): precision/recall of removed pairs.
    ground_truth: str = ""
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    clip_score: ClipScoreConfig = field(default_factory=ClipScoreConfig)
    # Pruned pools' shards: at most this many samples, fewer so that every vlm-train reader slot gets one.
    samples_per_shard: int = field(default=1000, metadata={"min": 1})


def load_bootstrap_config(path: str | Path | None, overrides: list[str] = ()) -> BootstrapConfig:
    """Read a bootstrap YAML (see configs/curate/bootstrap_demo.yaml), apply overrides, validate."""
    from vlmtrain.configlib import read_yaml_with_overrides

    cfg = from_dict(BootstrapConfig, read_yaml_with_overrides(path, overrides, "bootstrap config"))
    cfg.embed.check("embed")
    return cfg
