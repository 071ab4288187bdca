"""Copy-detection dedup (DINOv2 / LVD-142M, part 4): k-NN graph, cosine edges, connected components.

Every connected component of the similarity graph (k = 64 neighbours, cosine > 0.6) is one group of
copies; one member is kept. Keep rule: the highest ``quality`` score when one is given, ties and the
no-score case going to the smallest row index. Removed rows name their component's representative.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data_pipeline.vector.graph import GraphConfig, SimilarityGraph, similarity_graph
from data_pipeline.vector.results import PerSampleResult, reasons, summary
from data_pipeline.vector.validation import embedding_matrix, per_sample

REASON = "copy_duplicate"


@dataclass(frozen=True)
class CopyDedupConfig:
    """DINOv2 copy detection: k-NN graph, edges above ``threshold`` (section ``embedding.copy_dedup``)."""
    enabled: bool = False  # read by the pipeline, which runs the stage only when true
    k: int = field(default=64, metadata={"min": 1})
    threshold: float = field(default=0.6, metadata={"min": -1.0, "max": 1.0})  # edges: cosine strictly above


@dataclass
class CopyDedupResult(PerSampleResult):
    component: np.ndarray                     # (n,) int64 component id (0 … n_components−1)
    component_size: np.ndarray                # (n,) int64
    representative: np.ndarray                # (n,) int64 row kept for this row's component
    similarity_to_representative: np.ndarray  # (n,) float32 cosine (1 for the representative itself)
    graph: SimilarityGraph = summary()


def copy_dedup(embeddings: np.ndarray, cfg: CopyDedupConfig = CopyDedupConfig(), quality: np.ndarray | None = None,
               graph: GraphConfig = GraphConfig()) -> CopyDedupResult:
    """Group copies among the rows of ``embeddings`` (normalized here) and keep one per group; ``graph``: how
    the neighbours are found (a FAISS index or the cell join, ``vector.graph``)."""
    x = embedding_matrix(embeddings, "embeddings")
    n = len(x)
    quality = per_sample(quality, n, "quality")
    # scipy here, not at the top: every Ray worker imports the stage registry, and scipy would cost each ≈0.2 s
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    edges = similarity_graph(x, cfg.k, cfg.threshold, graph)
    adjacency = coo_matrix((np.ones(len(edges.rows), np.int8), (edges.rows, edges.cols)), shape=(n, n))
    _, component = connected_components(adjacency, directed=False)
    component = component.astype(np.int64)
    representative = representatives(component, quality)
    keep = representative == np.arange(n)
    similarity = np.einsum("ij,ij->i", x, x[representative])
    return CopyDedupResult(keep=keep, reason=reasons(keep, REASON), component=component,
                           component_size=np.bincount(component)[component],
                           representative=representative, similarity_to_representative=similarity,
                           graph=edges)


def representatives(group: np.ndarray, quality: np.ndarray | None) -> np.ndarray:
    """For each row, the row kept for its group: highest quality, then smallest row index."""
    n = len(group)
    rank = np.arange(n) if quality is None else np.lexsort((np.arange(n), -quality))
    best = np.full(group.max(initial=-1) + 1, -1, np.int64)
    groups, first = np.unique(group[rank], return_index=True)
    best[groups] = rank[first]
    return best[group]
