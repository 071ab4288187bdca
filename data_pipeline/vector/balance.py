"""Hierarchical k-means and balanced sampling (Vo et al. 2024, ssl-data-curation; part 8).

Clustering, level by level: level 1 clusters the samples, level l+1 clusters level l's centroids.
Each level runs k-means, then ``resampling_steps`` times: take ``resample_size`` points per cluster
(the closest to its centroid, or random), re-run k-means on those points only and re-assign every
point to the new centroids. Resampling pulls centroids away from dense regions, so clusters spread
uniformly over concepts rather than over density.

Sampling, top down: a target is split over the top-level clusters so that every cluster gets the
same cap, found by binary search as the largest c with
Σ min(c, size_i) ≤ target; the remainder goes one each to the largest clusters still above the cap
(ties → smaller id). Each cluster's share is split the same way over its child clusters, down to the
level-1 clusters, where the samples are picked at random (seeded per cluster) or closest to the
centroid. Sizes are counts of samples under a cluster.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from data_pipeline.vector.kmeans import Clustering, assign, kmeans
from data_pipeline.vector.results import PerSampleResult, reasons, summary
from data_pipeline.vector.retrieval import PICKS, pick_members
from data_pipeline.vector.validation import (ClippedWarning, VectorInputError, embedding_matrix,
                                             positive_int)
from vlmtrain.errors import ConfigError

REASON = "not_sampled"
RESAMPLE_PICKS = ("closest", "random")


@dataclass(frozen=True)
class BalanceConfig:
    """Hierarchical k-means with resampling, then a balanced sample of ``target_size`` (section
    ``embedding.balance``): ``hierarchical_kmeans`` reads the clustering fields, ``balanced_sampling``
    ``target_size``, ``pick`` and ``seed``."""
    enabled: bool = False  # read by the pipeline, which runs the stage only when true
    target_size: int = field(default=0, metadata={"min": 0})  # required (>= 1) when enabled
    n_clusters: list[int] = field(default_factory=lambda: [100, 10])  # level 1 (over samples) first, top level last
    resample_size: list[int] = field(default_factory=lambda: [10, 3])  # points per cluster in each level's resampling
    resampling_steps: int = field(default=10, metadata={"min": 0})
    resample_pick: str = field(default="closest", metadata={"choices": RESAMPLE_PICKS})
    spherical: bool = False  # ssl-data-curation uses L2 k-means
    kmeans_iterations: int = field(default=20, metadata={"min": 1})
    pick: str = field(default="random", metadata={"choices": PICKS})  # how the level-1 clusters' quota is drawn
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


@dataclass
class Hierarchy:
    levels: list[Clustering]  # levels[0] over the samples, levels[l] over levels[l−1].centroids

    def sample_counts(self) -> list[np.ndarray]:
        """Per level, the number of samples under each cluster."""
        counts = [self.levels[0].sizes().astype(np.int64)]
        for level in self.levels[1:]:
            counts.append(np.bincount(level.assignment, weights=counts[-1],
                                      minlength=level.n_clusters).astype(np.int64))
        return counts

    def cluster_path(self) -> np.ndarray:
        """(n_samples, n_levels) int64: each sample's cluster at every level."""
        path = [self.levels[0].assignment]
        for level in self.levels[1:]:
            path.append(level.assignment[path[-1]])
        return np.stack(path, axis=1)


def hierarchical_kmeans(embeddings: np.ndarray, cfg: BalanceConfig = BalanceConfig()) -> Hierarchy:
    """Multi-level k-means with resampling steps over the rows of ``embeddings`` (normalized here)."""
    x = embedding_matrix(embeddings, "embeddings")
    if len(cfg.n_clusters) == 0 or len(cfg.resample_size) != len(cfg.n_clusters):
        raise VectorInputError("resample_size", f"needs one value per level ({len(cfg.n_clusters)} levels), "
                               f"got {cfg.resample_size!r}")
    if cfg.resample_pick not in RESAMPLE_PICKS:
        raise VectorInputError("resample_pick", f"must be closest or random, got {cfg.resample_pick!r}")
    levels: list[Clustering] = []
    points = x
    for depth, (n_clusters, resample_size) in enumerate(zip(cfg.n_clusters, cfg.resample_size)):
        argument = f"n_clusters[{depth}]"
        clustering = _kmeans(points, n_clusters, cfg, cfg.seed + depth, argument)
        steps = cfg.resampling_steps if resample_size > 1 else 0
        for step in range(steps):
            sample = _resample(clustering, resample_size, cfg.resample_pick, (cfg.seed, depth, step))
            with warnings.catch_warnings():  # the resample may be smaller than n_clusters: k-means clips it
                warnings.simplefilter("ignore", ClippedWarning)
                refit = _kmeans(points[sample], clustering.n_clusters, cfg, cfg.seed + depth + 1000 * (step + 1),
                                argument)
            clustering = assign(points, refit.centroids)
        levels.append(clustering)
        points = clustering.centroids
    return Hierarchy(levels)


def _kmeans(points, n_clusters, cfg, seed, argument) -> Clustering:
    return kmeans(points, n_clusters, spherical=cfg.spherical, niter=cfg.kmeans_iterations, seed=seed,
                  argument=argument)


def _resample(clustering: Clustering, size: int, pick: str, key: tuple[int, ...]) -> np.ndarray:
    by_cluster = np.argsort(clustering.assignment, kind="stable")
    starts = np.searchsorted(clustering.assignment[by_cluster], np.arange(clustering.n_clusters + 1))
    chosen = [pick_members(by_cluster[starts[c]:starts[c + 1]], clustering.distance, size, pick, (*key, c))
              for c in range(clustering.n_clusters)]
    return np.sort(np.concatenate(chosen))


@dataclass
class BalancedSamplingResult(PerSampleResult):
    leaf_cluster: np.ndarray   # (n,) int64 level-1 cluster
    top_cluster: np.ndarray    # (n,) int64 top-level cluster
    centroid_distance: np.ndarray  # (n,) float32 squared L2 to the level-1 centroid
    quotas: list[np.ndarray] = summary()  # per level, samples drawn from each cluster


def balanced_sampling(hierarchy: Hierarchy, cfg: BalanceConfig) -> BalancedSamplingResult:
    """Top-down balanced selection of ``cfg.target_size`` samples from a hierarchy."""
    if cfg.pick not in PICKS:
        raise VectorInputError("pick", f"must be random or closest, got {cfg.pick!r}")
    counts = hierarchy.sample_counts()
    n = int(counts[0].sum())
    target = positive_int(cfg.target_size, "target_size")
    if target > n:
        warnings.warn(ClippedWarning(f"target_size={target} is larger than the pool ({n}); selecting all"),
                      stacklevel=2)
        target = n
    quotas = [np.zeros(len(c), np.int64) for c in counts]
    quotas[-1] = split_quota(counts[-1], target)
    for depth in range(len(counts) - 1, 0, -1):
        children = hierarchy.levels[depth].assignment
        by_parent = np.argsort(children, kind="stable")
        starts = np.searchsorted(children[by_parent], np.arange(len(counts[depth]) + 1))
        for parent in np.flatnonzero(quotas[depth]):
            kids = by_parent[starts[parent]:starts[parent + 1]]
            quotas[depth - 1][kids] = split_quota(counts[depth - 1][kids], quotas[depth][parent])
    leaf = hierarchy.levels[0]
    by_leaf = np.argsort(leaf.assignment, kind="stable")
    starts = np.searchsorted(leaf.assignment[by_leaf], np.arange(leaf.n_clusters + 1))
    keep = np.zeros(n, bool)
    for c in np.flatnonzero(quotas[0]):
        keep[pick_members(by_leaf[starts[c]:starts[c + 1]], leaf.distance, quotas[0][c], cfg.pick,
                          (cfg.seed, int(c)))] = True
    path = hierarchy.cluster_path()
    return BalancedSamplingResult(keep=keep, reason=reasons(keep, REASON), leaf_cluster=path[:, 0],
                                  top_cluster=path[:, -1], centroid_distance=leaf.distance, quotas=quotas)


def split_quota(sizes: np.ndarray, target: int) -> np.ndarray:
    """Balanced split of ``target`` over clusters of ``sizes``: a common cap (binary search for the
    largest c with Σ min(c, size) ≤ target), then +1 for the largest clusters still above it."""
    sizes = np.asarray(sizes, np.int64)
    if sizes.sum() <= target:
        return sizes.copy()
    low, high = 0, int(sizes.max())  # Σ min(low, ·) ≤ target < Σ min(high, ·)
    while high - low > 1:
        mid = (low + high) // 2
        if np.minimum(sizes, mid).sum() <= target:
            low = mid
        else:
            high = mid
    quota = np.minimum(sizes, low)
    remainder = target - int(quota.sum())
    above = np.flatnonzero(sizes > low)
    quota[above[np.lexsort((above, -sizes[above]))[:remainder]]] += 1
    return quota
