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

import numpy as np

from data_pipeline.vector.index import INDEX_KINDS, IndexConfig, build_index
from data_pipeline.vector.kmeans import assign, kmeans
from data_pipeline.vector.results import PerSampleResult, reasons, summary
from data_pipeline.vector.validation import (NoNeighboursWarning, VectorInputError, embedding_matrix,
                                             positive_int, same_width, unit_interval)
from vlmtrain.errors import ConfigError

REASON = "not_retrieved"
_QUERY_BLOCK = 65536
_KMEANS_ITERATIONS = 20  # cluster mode's k-means (not a YAML key, unlike semdedup's and balance's)
MODES = ("sample", "cluster")
PICKS = ("random", "closest")


@dataclass(frozen=True)
class RetrievalConfig:
    """LVD-142M retrieval: keep only the pool images the seed sets retrieve (section ``embedding.retrieval``).
    ``retrieve_by_sample`` reads the sample-mode fields, ``retrieve_by_cluster`` the cluster-mode ones."""
    enabled: bool = False  # read by the pipeline, which runs the stage only when true
    mode: str = field(default="sample", metadata={"choices": MODES})  # read by the pipeline: which function
    # Read by the pipeline: folders, as DecontaminateConfig.eval_sets; each is embedded and passed as ``seeds``.
    seed_sets: list[str] = field(default_factory=list)
    # sample mode: each seed image's k nearest pool images (above min_similarity when set)
    k: int = field(default=8, metadata={"min": 1})
    min_similarity: float | None = None
    # the pool's index: auto = exact Flat up to 100k images, IVF-Flat above; ivf_pq compresses huge pools
    index: str = field(default="auto", metadata={"choices": INDEX_KINDS})
    # cluster mode: clusters holding more than min_seeds seeds give per_cluster images each, max_total in all
    n_clusters: int = field(default=1000, metadata={"min": 1})  # LVD-142M: 100k clusters over a 1.2B pool
    min_seeds: int = field(default=3, metadata={"min": 0})
    per_cluster: int = field(default=10_000, metadata={"min": 1})
    max_total: int = field(default=1_000_000, metadata={"min": 1})  # cap per seed set
    pick: str = field(default="random", metadata={"choices": PICKS})
    seed: int = 0

    def check(self, key: str) -> None:
        if self.enabled and not self.seed_sets:
            raise ConfigError(f"'{key}.seed_sets' needs at least one folder when retrieval is enabled")


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
                       cfg: RetrievalConfig = RetrievalConfig()) -> SampleRetrievalResult:
    """Select the k nearest pool images of every seed (inputs normalized here)."""
    pool = embedding_matrix(pool, "pool")
    seeds = embedding_matrix(seeds, "seeds")
    same_width(pool, "pool", seeds, "seeds")
    floor = -np.inf if cfg.min_similarity is None else unit_interval(cfg.min_similarity, "min_similarity")
    index = build_index(pool, IndexConfig(kind=cfg.index), argument="pool")
    seed_hits = np.zeros(len(pool), np.int64)
    best_similarity = np.full(len(pool), -np.inf, np.float32)
    best_seed = np.full(len(pool), -1, np.int64)
    per_seed = np.zeros(len(seeds), np.int64)
    for start in range(0, len(seeds), _QUERY_BLOCK):
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


@dataclass
class ClusterRetrievalResult(PerSampleResult):
    cluster: np.ndarray              # (n_pool,) int64 pool image's cluster
    cluster_seeds: np.ndarray        # (n_pool,) int64 seed images in that cluster
    centroid_distance: np.ndarray    # (n_pool,) float32 squared L2 to the (unit) centroid
    contributed: np.ndarray = summary()  # (n_clusters,) int64 images each cluster gave
    seeds_per_cluster: np.ndarray = summary()  # (n_clusters,) int64
    centroids: np.ndarray = summary()  # (n_clusters, dim) unit centroids


def retrieve_by_cluster(pool: np.ndarray, seeds: np.ndarray,
                        cfg: RetrievalConfig = RetrievalConfig()) -> ClusterRetrievalResult:
    """Select pool images from the clusters the seed set falls into (inputs normalized here)."""
    pool = embedding_matrix(pool, "pool")
    seeds = embedding_matrix(seeds, "seeds")
    same_width(pool, "pool", seeds, "seeds")
    if cfg.pick not in PICKS:
        raise VectorInputError("pick", f"must be random or closest, got {cfg.pick!r}")
    per_cluster = positive_int(cfg.per_cluster, "per_cluster")
    max_total = positive_int(cfg.max_total, "max_total")
    clustering = kmeans(pool, cfg.n_clusters, spherical=True, niter=_KMEANS_ITERATIONS, seed=cfg.seed)
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
