"""The retrieval stage: keep only the candidates the seed sets retrieve (LVD-142M, ``vector.retrieval``).

Each seed set (a reference folder, embedded by the embed step) retrieves on its own, as LVD-142M
caps each set on its own; a row is kept when any set retrieves it. ``sample`` mode: each seed
image's k nearest candidates; ``cluster`` mode: the clusters the seeds fall into.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data_pipeline.candidates import Candidates, Verdict
from data_pipeline.vector.index import IndexConfig
from data_pipeline.vector.retrieval import (REASON, ClusterRetrievalConfig, SampleRetrievalConfig, retrieve_by_cluster,
                                            retrieve_by_sample)
from vlmtrain.errors import ConfigError

RETRIEVAL_MODES = ("sample", "cluster")
PICKS = ("random", "closest")


@dataclass
class RetrievalStageConfig:
    """LVD-142M retrieval: keep only the pool images the seed sets retrieve."""
    enabled: bool = False
    mode: str = field(default="sample", metadata={"choices": RETRIEVAL_MODES})
    seed_sets: list[str] = field(default_factory=list)  # folders, as eval_sets
    # sample mode: each seed image's k nearest pool images (above min_similarity when set)
    k: int = field(default=8, metadata={"min": 1})
    min_similarity: float | None = None
    # the pool's index: auto = exact Flat up to 100k images, IVF-Flat above; ivf_pq compresses huge pools
    index: str = field(default="auto", metadata={"choices": ("auto", "flat", "ivf_flat", "ivf_pq")})
    # cluster mode: clusters holding more than min_seeds seeds give per_cluster images each, max_total in all
    n_clusters: int = field(default=1000, metadata={"min": 1})
    min_seeds: int = field(default=3, metadata={"min": 0})
    per_cluster: int = field(default=10_000, metadata={"min": 1})
    max_total: int = field(default=1_000_000, metadata={"min": 1})
    pick: str = field(default="random", metadata={"choices": PICKS})
    seed: int = 0

    def check(self, key: str) -> None:
        if self.enabled and not self.seed_sets:
            raise ConfigError(f"'{key}.seed_sets' needs at least one folder when retrieval is enabled")


def retrieval(candidates: Candidates, cfg: RetrievalStageConfig) -> Verdict:
    x = candidates.vectors
    keep = np.zeros(len(x), bool)
    if cfg.mode == "sample":
        hits = np.zeros(len(x), np.int64)
        best = np.full(len(x), -np.inf, np.float32)
        best_seed = np.full(len(x), None, dtype=object)
        for seeds in candidates.references:
            result = retrieve_by_sample(x, seeds.vectors, SampleRetrievalConfig(
                k=cfg.k, min_similarity=cfg.min_similarity, index=IndexConfig(kind=cfg.index)))
            keep |= result.keep
            hits += result.seed_hits
            better = result.best_similarity > best
            best[better] = result.best_similarity[better]
            best_seed[better] = seeds.ids[result.best_seed[better]]
        similarity = np.where(np.isfinite(best), best, np.nan)
        return Verdict.of(keep, REASON, {"seed_hits": hits, "seed_similarity": similarity, "best_seed": best_seed})
    cluster_seeds = np.zeros(len(x), np.int64)
    for seeds in candidates.references:
        result = retrieve_by_cluster(x, seeds.vectors, ClusterRetrievalConfig(
            n_clusters=cfg.n_clusters, min_seeds=cfg.min_seeds, per_cluster=cfg.per_cluster,
            max_total=cfg.max_total, pick=cfg.pick, seed=cfg.seed))
        keep |= result.keep
        cluster_seeds += result.cluster_seeds
    # Every seed set clusters the same pool with the same seed: one clustering to report.
    return Verdict.of(keep, REASON, {"retrieval_cluster": result.cluster.astype(np.int64),
                                     "cluster_seeds": cluster_seeds})
