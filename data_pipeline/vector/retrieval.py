"""LVD-142M retrieval (DINOv2, part 7): grow a curated set from a seed set by similarity.

- Sample-based: each seed image retrieves its k nearest pool images (k = 4–32 in LVD-142M),
  optionally only those with cosine ≥ ``min_similarity``. Collisions are counted: a pool image
  retrieved by several seeds is selected once and records how many seeds hit it.
- Cluster-based: k-means over the pool; every cluster holding more than ``min_seeds`` seed images
  contributes ``per_cluster`` pool images (all of them when smaller), picked at random (seeded per
  cluster) or closest to the centroid. When the total would pass ``max_total`` (the per seed set
  cap), clusters with more seeds are served first (ties → smaller cluster id) and the last one
  served is cut short.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from tqdm import tqdm

from data_pipeline.vector.index import IndexConfig, build_index
from data_pipeline.vector.kmeans import assign, kmeans
from data_pipeline.vector.results import PerSampleResult, reasons, summary
from data_pipeline.vector.validation import (NoNeighboursWarning, VectorInputError, embedding_matrix,
                                             positive_int, same_width, unit_interval)

REASON = "not_retrieved"
_QUERY_BLOCK = 65536


@dataclass(frozen=True)
class SampleRetrievalConfig:
    k: int = 8
    min_similarity: float | None = None
    index: IndexConfig = field(default_factory=IndexConfig)
    progress: bool = False


@dataclass
class SampleRetrievalResult(PerSampleResult):
    seed_hits: np.ndarray        # (n_pool,) int64 seeds that retrieved this pool image
    best_seed: np.ndarray        # (n_pool,) int64 most similar of those seeds (−1: none)
    best_similarity: np.ndarray  # (n_pool,) float32 its cosine (−inf: none)
    per_seed: np.ndarray = summary()  # (n_seeds,) int64 pool images each seed retrieved (not per pool row)

    @property
    def collisions(self) -> int:
        """Retrievals that landed on an image another seed had already retrieved."""
        return int(self.seed_hits.sum() - (self.seed_hits > 0).sum())


def retrieve_by_sample(pool: np.ndarray, seeds: np.ndarray,
                       cfg: SampleRetrievalConfig = SampleRetrievalConfig()) -> SampleRetrievalResult:
    """Select the k nearest pool images of every seed (inputs normalized here)."""
    pool = embedding_matrix(pool, "pool")
    seeds = embedding_matrix(seeds, "seeds")
    same_width(pool, "pool", seeds, "seeds")
    floor = -np.inf if cfg.min_similarity is None else unit_interval(cfg.min_similarity, "min_similarity")
    index = build_index(pool, cfg.index, argument="pool")
    seed_hits = np.zeros(len(pool), np.int64)
    best_similarity = np.full(len(pool), -np.inf, np.float32)
    best_seed = np.full(len(pool), -1, np.int64)
    per_seed = np.zeros(len(seeds), np.int64)
    for start in tqdm(range(0, len(seeds), _QUERY_BLOCK), desc="retrieve", disable=not cfg.progress):
        sims, ids = index.search(seeds[start:start + _QUERY_BLOCK], cfg.k)
        hit = (ids >= 0) & (sims >= floor)
        per_seed[start:start + len(ids)] = hit.sum(axis=1)
        seed_row, slot = np.nonzero(hit)
        pool_row, sim = ids[seed_row, slot], sims[seed_row, slot]
        np.add.at(seed_hits, pool_row, 1)
        # Best seed per pool row: highest similarity, ties → smaller seed (earlier blocks win ties).
        order = np.lexsort((seed_row, -sim, pool_row))
        first = np.ones(len(order), bool)
        first[1:] = pool_row[order][1:] != pool_row[order][:-1]
        row, sim, seed = pool_row[order][first], sim[order][first], seed_row[order][first] + start
        better = sim > best_similarity[row]
        best_similarity[row[better]], best_seed[row[better]] = sim[better], seed[better]
    empty = int((per_seed == 0).sum())
    if empty:
        warnings.warn(NoNeighboursWarning(
            f"seeds: {empty} of {len(seeds)} seed images retrieved nothing (min_similarity={cfg.min_similarity})"),
            stacklevel=2)
    keep = seed_hits > 0
    return SampleRetrievalResult(keep=keep, reason=reasons(keep, REASON), seed_hits=seed_hits,
                                 best_seed=best_seed, best_similarity=best_similarity, per_seed=per_seed)


@dataclass(frozen=True)
class ClusterRetrievalConfig:
    n_clusters: int = 1000          # LVD-142M: 100k clusters over a 1.2B pool
    min_seeds: int = 3              # a cluster contributes when it holds MORE than this many seeds
    per_cluster: int = 10_000
    max_total: int = 1_000_000      # cap per seed set
    pick: Literal["random", "closest"] = "random"
    kmeans_iterations: int = 20
    seed: int = 0
    gpu: bool | None = None


@dataclass
class ClusterRetrievalResult(PerSampleResult):
    cluster: np.ndarray              # (n_pool,) int64 pool image's cluster
    cluster_seeds: np.ndarray        # (n_pool,) int64 seed images in that cluster
    centroid_distance: np.ndarray    # (n_pool,) float32 squared L2 to the (unit) centroid
    contributed: np.ndarray = summary()  # (n_clusters,) int64 images each cluster gave
    seeds_per_cluster: np.ndarray = summary()  # (n_clusters,) int64
    centroids: np.ndarray = summary()  # (n_clusters, dim) unit centroids


def retrieve_by_cluster(pool: np.ndarray, seeds: np.ndarray,
                        cfg: ClusterRetrievalConfig = ClusterRetrievalConfig()) -> ClusterRetrievalResult:
    """Select pool images from the clusters the seed set falls into (inputs normalized here)."""
    pool = embedding_matrix(pool, "pool")
    seeds = embedding_matrix(seeds, "seeds")
    same_width(pool, "pool", seeds, "seeds")
    if cfg.pick not in ("random", "closest"):
        raise VectorInputError("pick", f"must be random or closest, got {cfg.pick!r}")
    per_cluster = positive_int(cfg.per_cluster, "per_cluster")
    max_total = positive_int(cfg.max_total, "max_total")
    clustering = kmeans(pool, cfg.n_clusters, spherical=True, niter=cfg.kmeans_iterations, seed=cfg.seed,
                        gpu=cfg.gpu)
    seed_counts = np.bincount(assign(seeds, clustering.centroids).assignment, minlength=clustering.n_clusters)
    quota = cluster_quotas(seed_counts, clustering.sizes(), cfg.min_seeds, per_cluster, max_total)
    if not quota.any():
        warnings.warn(NoNeighboursWarning(
            f"seeds: no cluster holds more than min_seeds={cfg.min_seeds} of the {len(seeds)} seed images; "
            "nothing retrieved"), stacklevel=2)
    keep = np.zeros(len(pool), bool)
    by_cluster = np.argsort(clustering.assignment, kind="stable")
    starts = np.searchsorted(clustering.assignment[by_cluster], np.arange(clustering.n_clusters + 1))
    for c in np.flatnonzero(quota):
        members = by_cluster[starts[c]:starts[c + 1]]
        keep[pick_members(members, clustering.distance, quota[c], cfg.pick, (cfg.seed, int(c)))] = True
    return ClusterRetrievalResult(keep=keep, reason=reasons(keep, REASON), cluster=clustering.assignment,
                                  cluster_seeds=seed_counts[clustering.assignment],
                                  centroid_distance=clustering.distance, contributed=quota,
                                  seeds_per_cluster=seed_counts, centroids=clustering.centroids)


def cluster_quotas(seed_counts: np.ndarray, sizes: np.ndarray, min_seeds: int, per_cluster: int,
                   max_total: int) -> np.ndarray:
    """Images each cluster contributes under the per-cluster count and the per-seed-set cap."""
    quota = np.where(seed_counts > min_seeds, np.minimum(sizes, per_cluster), 0)
    order = np.lexsort((np.arange(len(quota)), -seed_counts))
    before = np.cumsum(quota[order]) - quota[order]
    quota[order] = np.clip(max_total - before, 0, quota[order])
    return quota


def pick_members(members: np.ndarray, distance: np.ndarray, count: int, pick: str,
                 rng_key: tuple[int, ...]) -> np.ndarray:
    """``count`` of ``members`` (row ids): closest to their centroid (ties → smaller row) or random."""
    if count >= len(members):
        return members
    if pick == "closest":
        return members[np.lexsort((members, distance[members]))[:count]]
    return np.sort(np.random.default_rng(list(rng_key)).choice(members, count, replace=False))
