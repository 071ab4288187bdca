"""The curation stages in pipeline order, in one table: the funnel, the reasons table and
``vlm-curate --help`` are read from it.

A stage declares its name (its step in the funnel), the config section that is its YAML schema, the
reasons it records on the rows it rejects, and one line for ``--help``. Read and decode errors are
open-ended (some carry the reader's message), so the validate stage owns every reason that no other
stage declares. A row-wise stage also declares how to build its function from the run's config: a
batch → batch callable (built once per worker) that adds its columns and ``reason_<name>``; the
scoring step applies them in registry order, so a new row-wise stage is its module plus its entry.
The global stages (dedup, the embedding stages) run in their own steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import pandas as pd

from data_pipeline.config import CurateConfig, EmbeddingConfig
from data_pipeline.stages.decode import validate
from data_pipeline.stages.clip_score import REASONS as CLIP_SCORE_REASONS
from data_pipeline.stages.heuristics import RULES, Heuristics
from data_pipeline.vector.balance import REASON as NOT_SAMPLED
from data_pipeline.vector.copy_dedup import REASON as COPY_DUPLICATE
from data_pipeline.vector.decontaminate import REASON as EVAL_CONTAMINATION
from data_pipeline.vector.retrieval import REASON as NOT_RETRIEVED
from data_pipeline.vector.semdedup import REASON as SEMANTIC_DUPLICATE


@dataclass(frozen=True)
class Stage:
    name: str
    section: str  # its config section (dotted path in the curate YAML)
    reasons: tuple[str, ...]  # () for the stage that owns every undeclared reason
    summary: str
    embedding: bool = False  # an embedding stage: part of a run only when its section enables it
    # A row-wise stage: the run's config → its batch function (which sets the column reason_<name>).
    build: Callable[[CurateConfig], Callable[[pd.DataFrame], pd.DataFrame]] | None = None

    @property
    def reason_column(self) -> str:
        return f"reason_{self.name}"


STAGES: tuple[Stage, ...] = (
    Stage("validate", "decode", (), "read and decode every sample safely (read/decode errors are its reasons)",
          build=lambda cfg: partial(validate, cfg=cfg.decode)),
    Stage("heuristics", "heuristics", RULES, "named caption and image rules (DataComp's basic filter by default)",
          build=lambda cfg: Heuristics(cfg.heuristics)),
    Stage("exact_dedup", "dedup", ("exact_duplicate_image", "exact_duplicate_pair"), "same image bytes (sha256)"),
    Stage("near_dedup", "dedup", ("near_duplicate",), "re-encodes, resizes, crops (thumbnails, then content)"),
    Stage("clip_score", "embedding.clip_score", tuple(CLIP_SCORE_REASONS.values()),
          "image-text CLIP score: a threshold or a top fraction", embedding=True),
    Stage("copy_dedup", "embedding.copy_dedup", (COPY_DUPLICATE,), "copies by image embedding (k-NN graph)",
          embedding=True),
    Stage("semdedup", "embedding.semdedup", (SEMANTIC_DUPLICATE,), "semantic duplicates within k-means clusters",
          embedding=True),
    Stage("decontaminate", "embedding.decontaminate", (EVAL_CONTAMINATION,), "near copies of eval images",
          embedding=True),
    Stage("retrieval", "embedding.retrieval", (NOT_RETRIEVED,), "keep what seed sets retrieve", embedding=True),
    Stage("balance", "embedding.balance", (NOT_SAMPLED,), "balanced sampling over clusters", embedding=True),
)


def run_stages(embedding: EmbeddingConfig | None = None) -> list[Stage]:
    """The stages a run has, in order: every non-embedding stage, and the embedding stages ``embedding``
    enables."""
    enabled = set(embedding.enabled_stages()) if embedding is not None else set()
    return [stage for stage in STAGES if not stage.embedding or stage.name in enabled]


def row_stages() -> list[Stage]:
    """The row-wise stages, in order."""
    return [s for s in STAGES if s.build is not None]


def row_reason(rows: pd.DataFrame) -> pd.Series:
    """Each row's first row-wise reason in registry order (missing when every row stage passed it)."""
    first, *later = row_stages()
    reason = rows[first.reason_column]
    for stage in later:
        reason = reason.fillna(rows[stage.reason_column])
    return reason


def stage(name: str) -> Stage:
    return next(s for s in STAGES if s.name == name)
