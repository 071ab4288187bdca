"""Typed curation configuration: dataclasses loaded from YAML plus ``key.sub=value`` overrides.

The generic loading (``from_dict``, ``apply_override``, ``ConfigError``) is vlmtrain's, so both
halves of the project validate keys the same way and name the offending key.
The defaults of ``HeuristicsConfig`` reproduce DataComp's "basic" filter.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

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
class DecodeConfig:
    max_pixels: int = field(default=89_478_485, metadata={"min": 1})  # PIL's own bomb limit
    max_caption_bytes: int = field(default=65_536, metadata={"min": 1})  # larger is not a caption


@dataclass
class HeuristicsConfig:
    """Every rule is named after its field; 0 (or an empty list) switches a limit off."""
    min_caption_chars: int = field(default=6, metadata={"min": 0})  # DataComp basic: > 5 characters
    max_caption_chars: int = field(default=0, metadata={"min": 0})
    min_caption_words: int = field(default=3, metadata={"min": 0})  # DataComp basic: > 2 words
    max_caption_words: int = field(default=0, metadata={"min": 0})
    min_image_side: int = field(default=200, metadata={"min": 0})  # DataComp basic: ≥ 200 px
    max_aspect_ratio: float = field(default=3.0, metadata={"min": 0.0})  # DataComp basic: ≤ 3
    min_image_bytes: int = field(default=0, metadata={"min": 0})
    # ISO 639-1 codes; "und" allows captions with too few letters to identify (e.g. "7").
    languages: list[str] = field(default_factory=lambda: ["en"])
    # Languages the detector chooses among: fewer candidates, fewer mistakes on short captions.
    language_candidates: list[str] = field(
        default_factory=lambda: ["en", "es", "fr", "de", "it", "pt", "nl", "ru", "zh", "ja"])
    # Short captions share words across languages: one with fewer than `language_full_letters` letters
    # is rejected as another language only when lingua's confidence (0-1) in it beats the best
    # allowed language by `language_margin`. See data_pipeline/stages/heuristics.py.
    language_margin: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0})
    language_full_letters: int = field(default=20, metadata={"min": 0})
    max_repeated_word_fraction: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    max_symbol_fraction: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    caption_blocklist: list[str] = field(default_factory=list)  # case-insensitive whole words/phrases
    url_blocklist: list[str] = field(default_factory=list)  # substrings of the URL (e.g. domains)


@dataclass
class DedupConfig:
    exact: bool = True  # same image bytes (sha256) → keep one
    near: bool = True
    # Near duplicates (re-encodes, resizes, crops up to `max_crop` a side): each row's `neighbours`
    # nearest rows by a colour thumbnail are aligned to it (the smaller image searched as a window
    # of the larger one); a pair is a duplicate when the aligned thumbnails differ by at most
    # `max_residual` RMS (0-255 levels), after a cheaper grey pre-check at `coarse_residual`, and
    # their content signatures (inside letterbox bars) differ by at most `max_content_distance`
    # (0: equal contents, ≈1: unrelated ones). See data_pipeline/stages/near_duplicates.py.
    neighbours: int = field(default=10, metadata={"min": 1})
    max_crop: float = field(default=0.1, metadata={"min": 0.0, "max": 0.4})
    coarse_residual: float = field(default=9.0, metadata={"min": 0.0})
    max_residual: float = field(default=3.5, metadata={"min": 0.0})
    max_content_distance: float = field(default=0.7, metadata={"min": 0.0})
    # Candidate search (data_pipeline/stages/near_candidates.py): k-means cells of about `cell_rows`
    # rows; a row's `neighbours` nearest are searched in the `probes` cells nearest its own.
    cell_rows: int = field(default=512, metadata={"min": 1})
    probes: int = field(default=12, metadata={"min": 1})


@dataclass
class OutputConfig:
    samples_per_shard: int = field(default=1000, metadata={"min": 1})
    # Rows the driver reads, decides and writes at a time (row groups of the parts and of
    # decisions.parquet): without embedding stages its memory is bounded by this, not by the pool.
    stream_rows: int = field(default=65536, metadata={"min": 1})


@dataclass
class RayConfig:
    workers: int = field(default=2, metadata={"min": 1})  # scoring actors
    # Fractional CPUs per actor: actors asking a whole CPU each starve Ray Data's own tasks on a
    # small machine (a silent deadlock on 2 cores).
    cpus_per_worker: float = field(default=0.5, metadata={"min": 0.01})
    num_cpus: int = field(default=0, metadata={"min": 0})  # local Ray only; 0 = all cores


@dataclass
class CurateConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    output_dir: str = field(default="", metadata={"required": True})
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    heuristics: HeuristicsConfig = field(default_factory=HeuristicsConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    batch_rows: int = field(default=256, metadata={"min": 1})  # rows per stage call inside a worker
    progress: bool = True
    # CLIP embedding + vector-search selection (defined below, next to the CLIP configs it uses).
    embedding: EmbeddingConfig = field(default_factory=lambda: EmbeddingConfig())

    def check(self) -> None:
        if not self.sources:
            raise ConfigError("config key 'sources' needs at least one source "
                              "(e.g. sources=[{format: webdataset, path: data/train}])")
        for i, source in enumerate(self.sources):
            if not source.path:
                raise ConfigError(f"config key 'sources[{i}].path' is required")
        self.embedding.check()

    def stage_fingerprint(self) -> str:
        """Hash of everything that changes the scored parts and duplicates: a resumed run must match it.
        ``embedding`` is left out: its embeddings are stamped with their model, its selection is redone
        every write, so changing it never re-scores the pool. So is ``output_dir``: a run moved, spelled
        another way or continued elsewhere (a bootstrap round starts from its pool's parts) scores the same."""
        stages = {k: v for k, v in to_dict(self).items()
                  if k not in ("output_dir", "ray", "progress", "output", "embedding")}
        return hashlib.sha256(json.dumps(stages, sort_keys=True).encode()).hexdigest()[:16]


def load_curate_config(path: str | Path | None, overrides: list[str] = ()) -> CurateConfig:
    """Read a YAML file (or start from defaults), apply overrides, build and validate."""
    raw = read_yaml_with_overrides(path, overrides)
    cfg = from_dict(CurateConfig, raw)
    cfg.check()
    return cfg


# ------------------------------------------------------------------ CLIP scoring and bootstrapping


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
    """How the embed stage's Ray actor pool runs a CLIP model over the pool. The model itself (a vlm-train
    checkpoint, or an open_clip model with a local weights file) is ``ModelSpec`` (below): given on
    the ``vlm-curate embed`` command line, as ``embedding.model`` of a curation run, or each bootstrap
    round's scorer (the round before it). ``precision`` and ``sparsify`` make a cheaper, inexact
    scorer (data_pipeline/scorer_variants.py; measured in BENCHMARKS.md "Cheaper scorers"); the
    defaults (fp32, no sparsification) are exact."""
    batch_size: int = field(default=256, metadata={"min": 1})  # images per forward
    workers: int = field(default=2, metadata={"min": 1})  # model actors
    # Fractional CPUs, as for the scoring actors: the model actors share the machine with the run's
    # Ray Data tasks, which whole-CPU actors would starve on 2 cores.
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


CLIP_SCORE_RULES = ("threshold", "top_fraction")


@dataclass
class ClipScoreConfig:
    """CLIP-score pruning of the rows the heuristics and dedup kept. ``threshold``: keep cosine ≥
    ``threshold`` (DataComp: ≥ 0.25–0.28 with ViT-B/32); ``top_fraction``: keep the best-scoring
    ``top_fraction`` of those rows (DataComp: top 30% by ViT-L/14)."""
    rule: str = field(default="top_fraction", metadata={"choices": CLIP_SCORE_RULES})
    threshold: float = field(default=0.25, metadata={"min": -1.0, "max": 1.0})
    top_fraction: float = field(default=0.3, metadata={"min": 0.0, "max": 1.0})


# ------------------------------------------------------------------ embedding stages of `vlm-curate run`
# Applied in data_pipeline/select_embeddings.py (order and reasons there); configs/curate/embedding_stages.yaml
# documents every key and where its default comes from.


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


@dataclass
class ClipScoreStageConfig(ClipScoreConfig):
    enabled: bool = False


@dataclass
class CopyDedupStageConfig:
    """DINOv2 copy detection over the image embeddings: k-NN graph, edges above ``threshold``."""
    enabled: bool = False
    k: int = field(default=64, metadata={"min": 1})
    threshold: float = field(default=0.6, metadata={"min": -1.0, "max": 1.0})


SEMDEDUP_KEEP = ("hardest", "easiest", "clip_score")


@dataclass
class SemDedupStageConfig:
    """SemDeDup within spherical k-means clusters: removed when cosine > 1 − epsilon to a kept-first member."""
    enabled: bool = False
    n_clusters: int = field(default=100, metadata={"min": 1})
    epsilon: float = field(default=0.05, metadata={"min": 0.0, "max": 2.0})
    keep: str = field(default="hardest", metadata={"choices": SEMDEDUP_KEEP})
    compare_with: str = field(default="all", metadata={"choices": ("all", "kept")})
    kmeans_iterations: int = field(default=20, metadata={"min": 1})
    seed: int = 0


@dataclass
class DecontaminateStageConfig:
    """Drop pool images with cosine ≥ ``threshold`` to any image of the eval sets."""
    enabled: bool = False
    eval_sets: list[str] = field(default_factory=list)  # folders: .tar shards, image files, vlm-eval sets
    threshold: float = field(default=0.45, metadata={"min": -1.0, "max": 1.0})


RETRIEVAL_MODES = ("sample", "cluster")
PICKS = ("random", "closest")


@dataclass
class RetrievalStageConfig:
    """LVD-142M retrieval: keep only the pool images the seed sets retrieve."""
    enabled: bool = False
    mode: str = field(default="sample", metadata={"choices": RETRIEVAL_MODES})
    seed_sets: list[str] = field(default_factory=list)  # folders, as eval_sets
    # sample mode: each seed image's k nearest pool images (above min_similarity when set)
    k: int = field(default=8, metadata={"min": 1})
    min_similarity: float | None = None
    # the pool's index: auto = exact Flat up to 100k images, IVF-Flat above; ivf_pq compresses huge pools
    index: str = field(default="auto", metadata={"choices": ("auto", "flat", "ivf_flat", "ivf_pq")})
    # cluster mode: clusters holding more than min_seeds seeds give per_cluster images each, max_total in all
    n_clusters: int = field(default=1000, metadata={"min": 1})
    min_seeds: int = field(default=3, metadata={"min": 0})
    per_cluster: int = field(default=10_000, metadata={"min": 1})
    max_total: int = field(default=1_000_000, metadata={"min": 1})
    pick: str = field(default="random", metadata={"choices": PICKS})
    seed: int = 0


@dataclass
class BalanceStageConfig:
    """ssl-data-curation: hierarchical k-means with resampling, then a balanced sample of target_size."""
    enabled: bool = False
    target_size: int = field(default=0, metadata={"min": 0})
    n_clusters: list[int] = field(default_factory=lambda: [100, 10])  # level 1 (over samples) first
    resample_size: list[int] = field(default_factory=lambda: [10, 3])  # one per level
    resampling_steps: int = field(default=10, metadata={"min": 0})
    resample_pick: str = field(default="closest", metadata={"choices": ("closest", "random")})
    spherical: bool = False
    kmeans_iterations: int = field(default=20, metadata={"min": 1})
    pick: str = field(default="random", metadata={"choices": PICKS})
    seed: int = 0


@dataclass
class EmbeddingConfig:
    """The embed step and the selection stages over its embeddings; all off by default."""
    model: ModelSpec = field(default_factory=ModelSpec)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    clip_score: ClipScoreStageConfig = field(default_factory=ClipScoreStageConfig)
    copy_dedup: CopyDedupStageConfig = field(default_factory=CopyDedupStageConfig)
    semdedup: SemDedupStageConfig = field(default_factory=SemDedupStageConfig)
    decontaminate: DecontaminateStageConfig = field(default_factory=DecontaminateStageConfig)
    retrieval: RetrievalStageConfig = field(default_factory=RetrievalStageConfig)
    balance: BalanceStageConfig = field(default_factory=BalanceStageConfig)

    def enabled_stages(self) -> list[str]:
        """Enabled stage names, in the order the selection applies them."""
        return [name for name in ("clip_score", "copy_dedup", "semdedup", "decontaminate", "retrieval", "balance")
                if getattr(self, name).enabled]

    def check(self) -> None:
        self.embed.check("embedding.embed")
        stages = self.enabled_stages()
        if stages and not self.model.is_set():
            raise ConfigError(f"embedding.{stages[0]} is enabled but 'embedding.model' names no model: set "
                              "embedding.model.checkpoint (a vlm-train run) or embedding.model.open_clip_model "
                              "(+ embedding.model.pretrained, a local weights file)")
        if self.model.checkpoint and self.model.open_clip_model:
            raise ConfigError("'embedding.model' takes checkpoint or open_clip_model, not both")
        if self.decontaminate.enabled and not self.decontaminate.eval_sets:
            raise ConfigError("'embedding.decontaminate.eval_sets' needs at least one folder when "
                              "decontaminate is enabled")
        if self.retrieval.enabled and not self.retrieval.seed_sets:
            raise ConfigError("'embedding.retrieval.seed_sets' needs at least one folder when retrieval is enabled")
        if self.balance.enabled:
            if self.balance.target_size < 1:
                raise ConfigError("'embedding.balance.target_size' must be >= 1 when balance is enabled")
            if not self.balance.n_clusters or len(self.balance.resample_size) != len(self.balance.n_clusters):
                raise ConfigError(f"'embedding.balance.resample_size' needs one value per level of "
                                  f"'embedding.balance.n_clusters' ({self.balance.n_clusters}), got "
                                  f"{self.balance.resample_size}")
            if min(self.balance.n_clusters + self.balance.resample_size) < 1:
                raise ConfigError("'embedding.balance.n_clusters' and 'resample_size' must be positive")


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
