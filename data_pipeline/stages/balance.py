"""The balance stage: a balanced sample of ``target_size`` candidates over a hierarchy of k-means
clusters (ssl-data-curation, ``vector.balance``). Last in the pipeline: it draws a fixed-size sample,
which any later filter would shrink below its target."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data_pipeline.candidates import Candidates, Verdict
from data_pipeline.stages.retrieval import PICKS
from data_pipeline.vector.balance import (REASON, BalancedSamplingConfig, HierarchicalKMeansConfig, balanced_sampling,
                                          hierarchical_kmeans)
from vlmtrain.errors import ConfigError


@dataclass
class BalanceStageConfig:
    """ssl-data-curation: hierarchical k-means with resampling, then a balanced sample of target_size."""
    enabled: bool = False
    target_size: int = field(default=0, metadata={"min": 0})
    n_clusters: list[int] = field(default_factory=lambda: [100, 10])  # level 1 (over samples) first
    resample_size: list[int] = field(default_factory=lambda: [10, 3])  # one per level
    resampling_steps: int = field(default=10, metadata={"min": 0})
    resample_pick: str = field(default="closest", metadata={"choices": ("closest", "random")})
    spherical: bool = False
    kmeans_iterations: int = field(default=20, metadata={"min": 1})
    pick: str = field(default="random", metadata={"choices": PICKS})
    seed: int = 0

    def check(self, key: str) -> None:
        if not self.enabled:
            return
        if self.target_size < 1:
            raise ConfigError(f"'{key}.target_size' must be >= 1 when balance is enabled")
        if not self.n_clusters or len(self.resample_size) != len(self.n_clusters):
            raise ConfigError(f"'{key}.resample_size' needs one value per level of '{key}.n_clusters' "
                              f"({self.n_clusters}), got {self.resample_size}")
        if min(self.n_clusters + self.resample_size) < 1:
            raise ConfigError(f"'{key}.n_clusters' and 'resample_size' must be positive")


def balance(candidates: Candidates, cfg: BalanceStageConfig) -> Verdict:
    hierarchy = hierarchical_kmeans(candidates.vectors, HierarchicalKMeansConfig(
        n_clusters=tuple(cfg.n_clusters), resample_size=tuple(cfg.resample_size),
        resampling_steps=cfg.resampling_steps, resample_pick=cfg.resample_pick, spherical=cfg.spherical,
        kmeans_iterations=cfg.kmeans_iterations, seed=cfg.seed))
    result = balanced_sampling(hierarchy, BalancedSamplingConfig(target_size=cfg.target_size, pick=cfg.pick,
                                                                 seed=cfg.seed))
    return Verdict.of(result.keep, REASON, {"balance_leaf_cluster": result.leaf_cluster.astype(np.int64),
                                            "balance_top_cluster": result.top_cluster.astype(np.int64)})
