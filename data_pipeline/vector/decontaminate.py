"""Eval-set decontamination (DINOv2, part 5): drop pool samples too similar to any eval image.

A pool sample is dropped when its cosine to its nearest eval-set embedding is ≥ ``threshold``
(0.45 in LVD-142M). The nearest eval row and the similarity are recorded for every pool sample.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from data_pipeline.vector.index import IndexConfig, build_index
from data_pipeline.vector.results import PerSampleResult, reasons
from data_pipeline.vector.validation import embedding_matrix, same_width, unit_interval

REASON = "eval_contamination"
_QUERY_BLOCK = 65536


@dataclass(frozen=True)
class DecontaminationConfig:
    threshold: float = 0.45
    index: IndexConfig = field(default_factory=IndexConfig)
    progress: bool = False


@dataclass
class DecontaminationResult(PerSampleResult):
    nearest_eval: np.ndarray  # (n,) int64 row of the most similar eval embedding
    similarity: np.ndarray    # (n,) float32 its cosine


def decontaminate(pool: np.ndarray, eval_embeddings: np.ndarray,
                  cfg: DecontaminationConfig = DecontaminationConfig()) -> DecontaminationResult:
    """Flag pool rows whose nearest eval embedding has cosine ≥ cfg.threshold (inputs normalized here)."""
    threshold = unit_interval(cfg.threshold, "threshold")
    pool = embedding_matrix(pool, "pool")
    evals = embedding_matrix(eval_embeddings, "eval_embeddings")
    same_width(pool, "pool", evals, "eval_embeddings")
    index = build_index(evals, cfg.index, argument="eval_embeddings")
    nearest = np.empty(len(pool), np.int64)
    similarity = np.empty(len(pool), np.float32)
    for start in tqdm(range(0, len(pool), _QUERY_BLOCK), desc="decontaminate", disable=not cfg.progress):
        sims, ids = index.search(pool[start:start + _QUERY_BLOCK], 1)
        nearest[start:start + len(ids)] = ids[:, 0]
        similarity[start:start + len(ids)] = sims[:, 0]
    keep = ~(similarity >= threshold)
    return DecontaminationResult(keep=keep, reason=reasons(keep, REASON), nearest_eval=nearest,
                                 similarity=similarity)
