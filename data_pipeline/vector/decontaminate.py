"""Eval-set decontamination (DINOv2, part 5): drop pool samples too similar to any eval image.

A pool sample is dropped when its cosine to its nearest eval-set embedding is ≥ ``threshold``
(0.45 in LVD-142M). The nearest eval row and the similarity are recorded for every pool sample.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data_pipeline.vector.index import IndexConfig, build_index
from data_pipeline.vector.results import PerSampleResult, reasons
from data_pipeline.vector.validation import embedding_matrix, same_width, unit_interval
from vlmtrain.errors import ConfigError

REASON = "eval_contamination"
_QUERY_BLOCK = 65536


@dataclass(frozen=True)
class DecontaminateConfig:
    """Drop pool images with cosine ≥ ``threshold`` to any eval image (section ``embedding.decontaminate``)."""
    enabled: bool = False  # read by the pipeline, which runs the stage only when true
    # Read by the pipeline: folders (.tar shards, image files, vlm-eval sets) whose images its embed step
    # turns into ``eval_embeddings``.
    eval_sets: list[str] = field(default_factory=list)
    threshold: float = field(default=0.45, metadata={"min": -1.0, "max": 1.0})

    def check(self, key: str) -> None:
        if self.enabled and not self.eval_sets:
            raise ConfigError(f"'{key}.eval_sets' needs at least one folder when decontaminate is enabled")


@dataclass
class DecontaminationResult(PerSampleResult):
    nearest_eval: np.ndarray  # (n,) int64 row of the most similar eval embedding
    similarity: np.ndarray    # (n,) float32 its cosine


def decontaminate(pool: np.ndarray, eval_embeddings: np.ndarray,
                  cfg: DecontaminateConfig = DecontaminateConfig()) -> DecontaminationResult:
    """Flag pool rows whose nearest eval embedding has cosine ≥ cfg.threshold (inputs normalized here)."""
    threshold = unit_interval(cfg.threshold, "threshold")
    pool = embedding_matrix(pool, "pool")
    evals = embedding_matrix(eval_embeddings, "eval_embeddings")
    same_width(pool, "pool", evals, "eval_embeddings")
    index = build_index(evals, IndexConfig(), argument="eval_embeddings")
    nearest = np.empty(len(pool), np.int64)
    similarity = np.empty(len(pool), np.float32)
    for start in range(0, len(pool), _QUERY_BLOCK):
        sims, ids = index.search(pool[start:start + _QUERY_BLOCK], 1)
        nearest[start:start + len(ids)] = ids[:, 0]
        similarity[start:start + len(ids)] = sims[:, 0]
    keep = ~(similarity >= threshold)
    return DecontaminationResult(keep=keep, reason=reasons(keep, REASON), nearest_eval=nearest,
                                 similarity=similarity)
