"""The semdedup stage: semantic duplicates within k-means clusters (SemDeDup, ``vector.semdedup``).

Inside each cluster the candidates are ranked by ``keep`` (``clip_score``: the highest CLIP score
first) and a row is dropped when its cosine to a higher-ranked one exceeds 1 − ``epsilon``. Its
config section is the library's ``SemDedupConfig``.
"""
from __future__ import annotations

import numpy as np

from data_pipeline.candidates import Candidates, Verdict
from data_pipeline.vector.semdedup import REASON, SemDedupConfig, semdedup as find_semantic_duplicates


def semdedup(candidates: Candidates, cfg: SemDedupConfig) -> Verdict:
    clip_score = candidates.clip_score.astype(np.float64) if cfg.keep == "clip_score" else None
    result = find_semantic_duplicates(candidates.vectors, cfg, clip_score)
    similarity = np.where(np.isfinite(result.max_similarity), result.max_similarity, np.nan).astype(np.float32)
    return Verdict.of(result.keep, REASON, {
        "semdedup_cluster": result.cluster.astype(np.int64),
        "semdedup_duplicate_of": candidates.references_to(result.most_similar, ~result.keep),
        "semdedup_similarity": similarity})
