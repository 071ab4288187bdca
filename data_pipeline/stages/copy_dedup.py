"""The copy_dedup stage: copies by image embedding (DINOv2 copy detection, ``vector.copy_dedup``).

A k-NN graph over the candidates' embeddings with edges above ``threshold``; each connected group
keeps one row, the one with the highest CLIP score (the best caption match survives), and the others
name it in ``copy_duplicate_of``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data_pipeline.candidates import Candidates, Verdict
from data_pipeline.vector.copy_dedup import REASON, CopyDedupConfig, copy_dedup as find_copies


@dataclass
class CopyDedupStageConfig:
    """DINOv2 copy detection over the image embeddings: k-NN graph, edges above ``threshold``."""
    enabled: bool = False
    k: int = field(default=64, metadata={"min": 1})
    threshold: float = field(default=0.6, metadata={"min": -1.0, "max": 1.0})


def copy_dedup(candidates: Candidates, cfg: CopyDedupStageConfig) -> Verdict:
    result = find_copies(candidates.vectors, CopyDedupConfig(k=cfg.k, threshold=cfg.threshold),
                         candidates.clip_score.astype(np.float64))
    return Verdict.of(result.keep, REASON, {
        "copy_duplicate_of": candidates.uid_of(result.representative, ~result.keep),
        "copy_group_size": result.component_size.astype(np.int64),
        "copy_similarity": result.similarity_to_representative.astype(np.float32)})
