"""Seeded k-means (faiss.Kmeans) plus the full assignment every clustering stage needs."""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from data_pipeline.vector.index import IndexConfig, gpu_wanted
from data_pipeline.vector.validation import clipped


@dataclass
class Clustering:
    centroids: np.ndarray    # (n_clusters, dim) float32; unit length when spherical
    assignment: np.ndarray   # (n,) int64: each row's nearest centroid
    distance: np.ndarray     # (n,) float32: squared L2 distance to that centroid (= 2 − 2·cos when spherical)

    @property
    def n_clusters(self) -> int:
        return len(self.centroids)

    def sizes(self) -> np.ndarray:
        return np.bincount(self.assignment, minlength=self.n_clusters)


def kmeans(x: np.ndarray, n_clusters: int, *, spherical: bool, niter: int = 20, seed: int = 0,
           max_points_per_centroid: int = 256, gpu: bool | None = None,
           argument: str = "n_clusters") -> Clustering:
    """k-means of the rows of ``x`` (float32); ``n_clusters`` above the row count is clipped with a warning.

    faiss trains on at most ``max_points_per_centroid`` × n_clusters rows (its own seeded sample);
    every row is then assigned to its nearest centroid.
    """
    n_clusters = clipped(n_clusters, len(x), argument, "the number of rows to cluster")
    trainer = faiss.Kmeans(x.shape[1], n_clusters, niter=niter, seed=seed, spherical=spherical,
                           max_points_per_centroid=max_points_per_centroid,
                           gpu=gpu_wanted(IndexConfig(gpu=gpu)), verbose=False)
    trainer.train(x)
    return assign(x, trainer.centroids)


def assign(x: np.ndarray, centroids: np.ndarray) -> Clustering:
    """Nearest centroid (L2; for unit vectors the same as highest cosine) of every row."""
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    nearest = faiss.IndexFlatL2(centroids.shape[1])
    nearest.add(centroids)
    distance, assignment = nearest.search(x, 1)
    return Clustering(centroids, assignment[:, 0].astype(np.int64), distance[:, 0])
