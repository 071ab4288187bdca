"""The semdedup stage: semantic duplicates within k-means clusters (SemDeDup, ``vector.semdedup``).

Inside each cluster the candidates are ranked by ``keep`` (``clip_score``: the highest CLIP score
first) and a row is dropped when its cosine to a higher-ranked one exceeds 1 − ``epsilon``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data_pipeline.candidates import Candidates, Verdict
from data_pipeline.vector.semdedup import REASON, SemDedupConfig, semdedup as find_semantic_duplicates

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


def semdedup(candidates: Candidates, cfg: SemDedupStageConfig) -> Verdict:
    by_score = cfg.keep == "clip_score"  # the library ranks by any given score
    result = find_semantic_duplicates(candidates.vectors, SemDedupConfig(
        n_clusters=cfg.n_clusters, epsilon=cfg.epsilon, keep="score" if by_score else cfg.keep,
        compare_with=cfg.compare_with, kmeans_iterations=cfg.kmeans_iterations, seed=cfg.seed),
        candidates.clip_score.astype(np.float64) if by_score else None)
    similarity = np.where(np.isfinite(result.max_similarity), result.max_similarity, np.nan).astype(np.float32)
    return Verdict.of(result.keep, REASON, {
        "semdedup_cluster": result.cluster.astype(np.int64),
        "semdedup_duplicate_of": candidates.uid_of(result.most_similar, ~result.keep),
        "semdedup_similarity": similarity})
