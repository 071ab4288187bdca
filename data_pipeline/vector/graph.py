"""The similarity graph of a pool: which pairs of samples have cosine above a threshold.

An edge (i, j) exists when j is among i's k most similar other samples, or i among j's, and their
cosine is above the threshold (DINOv2's copy-detection graph: k = 64, cosine > 0.6). Two ways to
find the neighbours, same definition:

- ``index``: a FAISS k-NN search of every sample against the pool (Flat: exact; IVF: approximate;
  on GPU when one is visible). Right for small pools and for GPUs.
- ``cell_join``: for large pools on CPU. One k-means (nlist cells) splits the pool; each sample is
  compared, by one matrix product per cell, with the members of its ``join_nprobe`` nearest cells,
  and the pair is kept when either side found the other. A per-query IVF search cannot use BLAS
  and is ~30× slower here (1M × 256: ≈1k queries/s on 2 cores). Near copies fall in the same or
  a neighbouring cell; `tools/bench_dedup.py` measures the recall against brute force.
  ``nlist`` defaults to the power of two nearest √(join_nprobe · n), which balances assigning the
  pool to cells (n · nlist products) against the joins (n · join_nprobe · n/nlist products).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import faiss
import numpy as np
from tqdm import tqdm

from data_pipeline.vector.index import IndexConfig, build_index, gpu_wanted, training_sample
from data_pipeline.vector.kmeans import kmeans
from data_pipeline.vector.validation import VectorInputError, clipped, positive_int, unit_interval

GraphMethod = Literal["auto", "index", "cell_join"]
_QUERY_BLOCK = 8192


@dataclass(frozen=True)
class GraphConfig:
    method: GraphMethod = "auto"     # auto: index for small pools (≤ index.flat_max) or on GPU, else cell_join
    index: IndexConfig = field(default_factory=IndexConfig)
    join_nprobe: int = 8             # cell_join: cells each sample is compared with (8: recall 1.0 in bench_dedup)
    join_nlist: int | None = None    # cell_join: None → power of two nearest √(join_nprobe · n)
    kmeans_iterations: int = 10
    progress: bool = False


@dataclass
class SimilarityGraph:
    """Undirected edges (i < j) with their cosine, plus how they were found."""

    n: int
    rows: np.ndarray        # int64
    cols: np.ndarray        # int64
    similarity: np.ndarray  # float32
    method: str
    nlist: int | None = None
    nprobe: int | None = None


def resolve_method(n: int, cfg: GraphConfig) -> str:
    if cfg.method != "auto":
        return cfg.method
    small = n <= cfg.index.flat_max or cfg.index.kind != "auto"
    return "index" if small or gpu_wanted(cfg.index) else "cell_join"


def similarity_graph(x: np.ndarray, k: int, threshold: float, cfg: GraphConfig = GraphConfig()) -> SimilarityGraph:
    """Graph over the rows of ``x`` (L2-normalized float32); see the module docstring."""
    threshold = unit_interval(threshold, "threshold")
    n = len(x)
    method = resolve_method(n, cfg)
    if n < 2:
        positive_int(k, "k")
        empty = np.zeros(0, np.int64)
        return SimilarityGraph(n, empty, empty, np.zeros(0, np.float32), method)
    k = clipped(k, n - 1, "k", "the number of other samples in the pool")
    if method == "index":
        src, dst, sim, nlist, nprobe = _index_neighbours(x, k, threshold, cfg)
    elif method == "cell_join":
        src, dst, sim, nlist, nprobe = _cell_join_neighbours(x, k, threshold, cfg)
    else:
        raise VectorInputError("graph.method", f"must be auto, index or cell_join, got {cfg.method!r}")
    rows, cols, sim = _undirected(src, dst, sim)
    return SimilarityGraph(n, rows, cols, sim, method, nlist, nprobe)


def _index_neighbours(x, k, threshold, cfg):
    index = build_index(x, cfg.index, argument="pool")
    sources, targets, sims = [], [], []
    for start in tqdm(range(0, len(x), _QUERY_BLOCK), desc="k-NN search", disable=not cfg.progress):
        similarity, ids = index.search(x[start:start + _QUERY_BLOCK], k + 1)
        row = np.arange(start, start + len(ids))[:, None]
        other = (ids >= 0) & (ids != row)
        # Drop the query itself wherever it sits (exact copies tie with it), then keep k.
        keep = other & (np.cumsum(other, axis=1) <= k) & (similarity > threshold)
        i, j = np.nonzero(keep)
        sources.append(row[i, 0])
        targets.append(ids[i, j])
        sims.append(similarity[i, j])
    return np.concatenate(sources), np.concatenate(targets), np.concatenate(sims), index.nlist, index.nprobe


def _cell_join_neighbours(x, k, threshold, cfg):
    n = len(x)
    nprobe = positive_int(cfg.join_nprobe, "graph.join_nprobe")
    nlist = cfg.join_nlist or 2 ** round(math.log2(math.sqrt(nprobe * n)))
    nlist = max(1, min(nlist, n // 39))
    nprobe = min(nprobe, nlist)
    sample = training_sample(n, nlist * cfg.index.train_points_per_list, cfg.index.seed)
    cells = kmeans(x[sample], nlist, spherical=True, niter=cfg.kmeans_iterations, seed=cfg.index.seed,
                   gpu=False, argument="graph.join_nlist").centroids
    probes = _nearest_cells(x, cells, nprobe)
    primary = probes[:, 0]
    members_order = np.argsort(primary, kind="stable")
    member_start = np.searchsorted(primary[members_order], np.arange(nlist + 1))
    by_cell = x[members_order]
    probe_cell = probes.ravel()
    prober_order = np.argsort(probe_cell, kind="stable")
    prober_start = np.searchsorted(probe_cell[prober_order], np.arange(nlist + 1))
    prober_row = prober_order // nprobe
    sources, targets, sims = [], [], []
    for cell in tqdm(range(nlist), desc="cell join", disable=not cfg.progress):
        members = members_order[member_start[cell]:member_start[cell + 1]]
        queries = prober_row[prober_start[cell]:prober_start[cell + 1]]
        block = by_cell[member_start[cell]:member_start[cell + 1]]
        for q0 in range(0, len(queries) if len(members) else 0, _QUERY_BLOCK):
            q = queries[q0:q0 + _QUERY_BLOCK]
            similarity = x[q] @ block.T
            i, j = np.nonzero(similarity > threshold)
            sources.append(q[i])
            targets.append(members[j])
            sims.append(similarity[i, j])
    src, dst, sim = np.concatenate(sources), np.concatenate(targets), np.concatenate(sims)
    # A pair found from either side is a neighbour of both: symmetrize, dedupe, keep each node's top k.
    src, dst, sim = np.concatenate([src, dst]), np.concatenate([dst, src]), np.concatenate([sim, sim])
    other = src != dst
    src, dst, sim = src[other], dst[other], sim[other]
    order = np.lexsort((dst, -sim, src))
    src, dst, sim = src[order], dst[order], sim[order]
    first = np.ones(len(src), bool)
    first[1:] = (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])
    src, dst, sim = src[first], dst[first], sim[first]
    group_start = np.searchsorted(src, src)  # sorted by src: rank of an edge within its source
    top_k = np.arange(len(src)) - group_start < k
    return src[top_k], dst[top_k], sim[top_k], nlist, nprobe


def _nearest_cells(x: np.ndarray, cells: np.ndarray, nprobe: int) -> np.ndarray:
    nearest = faiss.IndexFlatIP(cells.shape[1])
    nearest.add(cells)
    return nearest.search(x, nprobe)[1].astype(np.int64)


def _undirected(src: np.ndarray, dst: np.ndarray, sim: np.ndarray):
    rows, cols = np.minimum(src, dst), np.maximum(src, dst)
    order = np.lexsort((cols, rows))
    rows, cols, sim = rows[order], cols[order], sim[order]
    first = np.ones(len(rows), bool)
    first[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
    return rows[first].astype(np.int64), cols[first].astype(np.int64), sim[first].astype(np.float32)
