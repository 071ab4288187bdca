"""The curation stages in pipeline order, in one table. The run, the stage sections of the curate
config, the funnel, the reasons table, ``vlm-curate --help`` and the report are all read from it.

A stage declares its name (its step in the funnel), its config section (a dotted path in the curate
YAML) and that section's dataclass (the YAML schema, declared in the stage's module, or for an
embedding stage in the ``vector`` module it calls, whose functions take that same object; ``config``
builds the section from it), the reasons it records on the rows it rejects, one line for ``--help``,
and its kind and function:

  ROW        ``function(section) →`` a batch function, built once per worker, that adds the stage's
             columns and ``reason_<name>``; the score step applies them in order to every row read.
  GLOBAL     ``function(candidates, section) → Verdict`` over every row still kept when its turn comes
             (``data_pipeline.candidates``): stages that must see all rows at once, such as dedup.
             They run in the dedup step, which stores their verdicts for the later steps.
  EMBEDDING  the same, over the candidates' CLIP embeddings: they run in the write step, after the embed
             step, only when their section is enabled (and names a model). ``references`` names the
             field of the section that lists folders the embed step also embeds for the stage.

A global or embedding stage whose section has an ``enabled`` field runs only when it is true. Read
and decode errors are open-ended (some carry the reader's message), so the validate stage owns every
reason that no other stage declares.

Adding a stage is its module (config dataclass + function) and one line in ``STAGES``.

Why the embedding stages come in this order: CLIP-score pruning is a per-row quality bar, so it
comes before the stages that keep one row per group (dedup run first could keep the one member CLIP
score then drops, losing the group); copy_dedup keeps the highest CLIP score of a group for the same
reason. Exact copies go before SemDeDup so its clusters are not crowded by them. Decontamination and
retrieval follow LVD-142M's order (dedup, remove eval near-duplicates, retrieve), so nothing
retrieved is an eval image; balanced sampling comes last because it draws a fixed-size sample, which
any later filter would shrink below its target.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd

from data_pipeline.stages.balance import balance
from data_pipeline.stages.clip_score import REASONS as CLIP_SCORE_REASONS, ClipScoreStageConfig, clip_score
from data_pipeline.stages.copy_dedup import copy_dedup
from data_pipeline.stages.decode import DecodeConfig, validator
from data_pipeline.stages.decontaminate import decontaminate
from data_pipeline.stages.dedup import EXACT_REASONS, NEAR_DUPLICATE, DedupConfig, exact_dedup, near_dedup
from data_pipeline.stages.heuristics import RULES, Heuristics, HeuristicsConfig
from data_pipeline.stages.retrieval import retrieval
from data_pipeline.stages.semdedup import semdedup
from data_pipeline.vector.balance import REASON as NOT_SAMPLED, BalanceConfig
from data_pipeline.vector.copy_dedup import REASON as COPY_DUPLICATE, CopyDedupConfig
from data_pipeline.vector.decontaminate import REASON as EVAL_CONTAMINATION, DecontaminateConfig
from data_pipeline.vector.retrieval import REASON as NOT_RETRIEVED, RetrievalConfig
from data_pipeline.vector.semdedup import REASON as SEMANTIC_DUPLICATE, SemDedupConfig

ROW, GLOBAL, EMBEDDING = "row", "global", "embedding"


@dataclass(frozen=True)
class Stage:
    name: str
    section: str  # dotted path of its config section in the curate YAML
    config: type  # that section's dataclass
    reasons: tuple[str, ...]  # () for the stage that owns every undeclared reason
    summary: str
    kind: str  # ROW, GLOBAL or EMBEDDING
    function: Callable
    references: str = ""  # EMBEDDING: the section's field listing folders to embed for the stage

    @property
    def reason_column(self) -> str:
        return f"reason_{self.name}"


STAGES: tuple[Stage, ...] = (
    Stage("validate", "decode", DecodeConfig, (), "read and decode every sample safely (read/decode errors are its "
          "reasons)", ROW, validator),
    Stage("heuristics", "heuristics", HeuristicsConfig, RULES, "named caption and image rules (DataComp's basic "
          "filter by default)", ROW, Heuristics),
    Stage("exact_dedup", "dedup", DedupConfig, EXACT_REASONS, "same image bytes (sha256)", GLOBAL, exact_dedup),
    Stage("near_dedup", "dedup", DedupConfig, (NEAR_DUPLICATE,), "re-encodes, resizes, crops (thumbnails, then "
          "content)", GLOBAL, near_dedup),
    Stage("clip_score", "embedding.clip_score", ClipScoreStageConfig, tuple(CLIP_SCORE_REASONS.values()),
          "image-text CLIP score: a threshold or a top fraction", EMBEDDING, clip_score),
    Stage("copy_dedup", "embedding.copy_dedup", CopyDedupConfig, (COPY_DUPLICATE,),
          "copies by image embedding (k-NN graph)", EMBEDDING, copy_dedup),
    Stage("semdedup", "embedding.semdedup", SemDedupConfig, (SEMANTIC_DUPLICATE,),
          "semantic duplicates within k-means clusters", EMBEDDING, semdedup),
    Stage("decontaminate", "embedding.decontaminate", DecontaminateConfig, (EVAL_CONTAMINATION,),
          "near copies of eval images", EMBEDDING, decontaminate, references="eval_sets"),
    Stage("retrieval", "embedding.retrieval", RetrievalConfig, (NOT_RETRIEVED,), "keep what seed sets retrieve",
          EMBEDDING, retrieval, references="seed_sets"),
    Stage("balance", "embedding.balance", BalanceConfig, (NOT_SAMPLED,), "balanced sampling over clusters",
          EMBEDDING, balance),
)


def section_of(cfg: Any, stage: Stage) -> Any:
    """The stage's config section in the run's ``CurateConfig``."""
    for key in stage.section.split("."):
        cfg = getattr(cfg, key)
    return cfg


def enabled(cfg: Any, stage: Stage) -> bool:
    return getattr(section_of(cfg, stage), "enabled", True)


def of_kind(kind: str) -> list[Stage]:
    """The stages of one kind, in order."""
    return [s for s in STAGES if s.kind == kind]


def row_stages() -> list[Stage]:
    return of_kind(ROW)


def run_stages(cfg: Any = None, embedded: bool = False) -> list[Stage]:
    """The stages a run has, in order: the row stages, the enabled global stages and, when the embedding stages
    ran (``embedded``), the enabled ones. Without ``cfg``: the row and global stages."""
    def in_run(stage: Stage) -> bool:
        if stage.kind == ROW:
            return True
        if cfg is None:
            return stage.kind == GLOBAL
        return (stage.kind == GLOBAL or embedded) and enabled(cfg, stage)

    return [s for s in STAGES if in_run(s)]


def row_reason(rows: pd.DataFrame) -> pd.Series:
    """Each row's first row-wise reason in registry order (missing when every row stage passed it)."""
    first, *later = row_stages()
    reason = rows[first.reason_column]
    for stage in later:
        reason = reason.fillna(rows[stage.reason_column])
    return reason
