"""The copy_dedup stage: copies by image embedding (DINOv2 copy detection, ``vector.copy_dedup``).

A k-NN graph over the candidates' embeddings with edges above ``threshold``; each connected group
keeps one row, the one with the highest CLIP score (the best caption match survives), and the others
name it in ``copy_duplicate_of``. Its config section is the library's ``CopyDedupConfig``.
"""
from __future__ import annotations

import numpy as np

from data_pipeline.candidates import Candidates, Verdict
from data_pipeline.vector.copy_dedup import REASON, CopyDedupConfig, copy_dedup as find_copies


def copy_dedup(candidates: Candidates, cfg: CopyDedupConfig) -> Verdict:
    result = find_copies(candidates.vectors, cfg, candidates.clip_score.astype(np.float64))
    return Verdict.of(result.keep, REASON, {
        "copy_duplicate_of": candidates.references_to(result.representative, ~result.keep),
        "copy_group_size": result.component_size.astype(np.int64),
        "copy_similarity": result.similarity_to_representative.astype(np.float32)})
