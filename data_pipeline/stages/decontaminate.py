"""The decontaminate stage: drop candidates that are near copies of an eval image (DINOv2,
``vector.decontaminate``). Its reference folders (``eval_sets``) are embedded by the embed step. Its
config section is the library's ``DecontaminateConfig``."""
from __future__ import annotations

import numpy as np

from data_pipeline.candidates import Candidates, Verdict
from data_pipeline.embed.store import Embedded
from data_pipeline.vector.decontaminate import REASON, DecontaminateConfig, decontaminate as nearest_eval


def decontaminate(candidates: Candidates, cfg: DecontaminateConfig) -> Verdict:
    evals = Embedded.concat(candidates.references)
    result = nearest_eval(candidates.vectors, evals.vectors, cfg)
    return Verdict.of(result.keep, REASON, {"eval_similarity": result.similarity.astype(np.float32),
                                            "nearest_eval": evals.ids[result.nearest_eval]})
