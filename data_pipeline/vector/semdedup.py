"""SemDeDup (Abbas et al. 2023, part 6): semantic near-duplicates within k-means clusters.

Spherical k-means splits the pool; inside each cluster the members are ranked by the keep rule and a
member is removed when its cosine to a higher-ranked member exceeds 1 − ε.

- ``keep="hardest"`` (the paper's choice) ranks the member farthest from the centroid first,
  ``"easiest"`` the closest first, ``"clip_score"`` the highest given CLIP score first; ties → smaller row.
- ``compare_with="all"`` is the paper's rule: any higher-ranked member counts, removed or not.
  ``"kept"`` is the greedy variant: only members already kept count, so a chain a≈b≈c with a≉c
  keeps a and c.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data_pipeline.vector.kmeans import kmeans
from data_pipeline.vector.results import PerSampleResult, reasons, summary
from data_pipeline.vector.validation import VectorInputError, embedding_matrix, per_sample

REASON = "semantic_duplicate"
_ROW_BLOCK = 4096
KEEP_RULES = ("hardest", "easiest", "clip_score")
COMPARE_WITH = ("all", "kept")


@dataclass(frozen=True)
class SemDedupConfig:
    """SemDeDup within spherical k-means clusters (section ``embedding.semdedup``)."""
    enabled: bool = False  # read by the pipeline, which runs the stage only when true
    n_clusters: int = field(default=100, metadata={"min": 1})
    epsilon: float = field(default=0.05, metadata={"min": 0.0, "max": 2.0})  # removed when cosine > 1 − epsilon
    keep: str = field(default="hardest", metadata={"choices": KEEP_RULES})
    compare_with: str = field(default="all", metadata={"choices": COMPARE_WITH})
    kmeans_iterations: int = field(default=20, metadata={"min": 1})
    seed: int = 0


@dataclass
class SemDedupResult(PerSampleResult):
    cluster: np.ndarray              # (n,) int64
    centroid_similarity: np.ndarray  # (n,) float32 cosine to the cluster centroid
    max_similarity: np.ndarray       # (n,) float32 highest cosine to a member it was compared with (−inf: none)
    most_similar: np.ndarray         # (n,) int64 that member's row (−1: none)
    centroids: np.ndarray = summary()  # (n_clusters, dim) unit centroids


def semdedup(embeddings: np.ndarray, cfg: SemDedupConfig = SemDedupConfig(),
             clip_score: np.ndarray | None = None) -> SemDedupResult:
    """Remove semantic duplicates from the rows of ``embeddings`` (normalized here); ``clip_score``: one per
    row, for ``keep="clip_score"``."""
    x = embedding_matrix(embeddings, "embeddings")
    clip_score = per_sample(clip_score, len(x), "clip_score")
    if not 0 <= cfg.epsilon <= 2:
        raise VectorInputError("epsilon", f"must lie in [0, 2], got {cfg.epsilon!r}")
    if cfg.keep not in KEEP_RULES:
        raise VectorInputError("keep", f"must be one of {', '.join(KEEP_RULES)}, got {cfg.keep!r}")
    if cfg.keep == "clip_score" and clip_score is None:
        raise VectorInputError("clip_score", "keep='clip_score' needs one CLIP score per sample")
    if cfg.compare_with not in COMPARE_WITH:
        raise VectorInputError("compare_with", f"must be all or kept, got {cfg.compare_with!r}")
    clustering = kmeans(x, cfg.n_clusters, spherical=True, niter=cfg.kmeans_iterations, seed=cfg.seed)
    cluster = clustering.assignment
    centroid_similarity = np.einsum("ij,ij->i", x, clustering.centroids[cluster])
    if cfg.keep == "clip_score":
        priority = -clip_score
    else:
        priority = centroid_similarity if cfg.keep == "hardest" else -centroid_similarity
    # Whole pool in keep order: by cluster, then priority, then row.
    order = np.lexsort((np.arange(len(x)), priority, cluster))
    starts = np.searchsorted(cluster[order], np.arange(clustering.n_clusters + 1))
    max_similarity = np.full(len(x), -np.inf, np.float32)
    most_similar = np.full(len(x), -1, np.int64)
    keep = np.ones(len(x), bool)
    compare = _compare_with_all if cfg.compare_with == "all" else _compare_with_kept
    for c in range(clustering.n_clusters):
        members = order[starts[c]:starts[c + 1]]
        if len(members) > 1:
            best, arg, kept = compare(x[members], 1 - cfg.epsilon)
            max_similarity[members], most_similar[members], keep[members] = best, members[arg], kept
            most_similar[members[arg < 0]] = -1
    return SemDedupResult(keep=keep, reason=reasons(keep, REASON), cluster=cluster,
                          centroid_similarity=centroid_similarity, max_similarity=max_similarity,
                          most_similar=most_similar, centroids=clustering.centroids)


def _compare_with_all(members: np.ndarray, limit: float):
    """Each member's max cosine to any earlier (higher-ranked) member; removed when above limit."""
    s = len(members)
    best = np.full(s, -np.inf, np.float32)
    arg = np.full(s, -1, np.int64)
    for a in range(1, s, _ROW_BLOCK):
        b = min(s, a + _ROW_BLOCK)
        sims = members[a:b] @ members[:b].T
        sims[np.arange(b - a)[:, None] + a <= np.arange(b)[None, :]] = -np.inf  # only earlier members
        arg[a:b] = sims.argmax(axis=1)
        best[a:b] = sims[np.arange(b - a), arg[a:b]]
    return best, arg, ~(best > limit)


def _compare_with_kept(members: np.ndarray, limit: float):
    """Greedy in rank order: a member is removed when its max cosine to an already kept one exceeds limit."""
    s = len(members)
    best = np.full(s, -np.inf, np.float32)
    arg = np.full(s, -1, np.int64)
    kept = np.zeros(s, bool)
    for j in range(s):
        if best[j] > limit:
            continue
        kept[j] = True
        sims = members @ members[j]
        later = np.arange(s) > j
        better = later & (sims > best)
        best[better], arg[better] = sims[better], j
    return best, arg, kept
