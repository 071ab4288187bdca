"""The decontaminate stage: drop candidates that are near copies of an eval image (DINOv2,
``vector.decontaminate``). Its reference folders (``eval_sets``) are embedded by the embed step."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data_pipeline.candidates import Candidates, Verdict
from data_pipeline.embed.store import Embedded
from data_pipeline.vector.decontaminate import REASON, DecontaminationConfig, decontaminate as nearest_eval
from vlmtrain.errors import ConfigError


@dataclass
class DecontaminateStageConfig:
    """Drop pool images with cosine ≥ ``threshold`` to any image of the eval sets."""
    enabled: bool = False
    eval_sets: list[str] = field(default_factory=list)  # folders: .tar shards, image files, vlm-eval sets
    threshold: float = field(default=0.45, metadata={"min": -1.0, "max": 1.0})

    def check(self, key: str) -> None:
        if self.enabled and not self.eval_sets:
            raise ConfigError(f"'{key}.eval_sets' needs at least one folder when decontaminate is enabled")


def decontaminate(candidates: Candidates, cfg: DecontaminateStageConfig) -> Verdict:
    evals = Embedded.concat(candidates.references)
    result = nearest_eval(candidates.vectors, evals.vectors, DecontaminationConfig(threshold=cfg.threshold))
    return Verdict.of(result.keep, REASON, {"eval_similarity": result.similarity.astype(np.float32),
                                            "nearest_eval": evals.ids[result.nearest_eval]})
