"""FAISS indexes for cosine search: inner product over L2-normalized float32 vectors.

Which index (``IndexConfig.kind="auto"``): an exact ``Flat`` index up to ``flat_max`` vectors, an
``IVF-Flat`` above it. ``ivf_pq`` (compressed codes) is for retrieval over pools too large to hold as
float32. Rules for the IVF knobs, each overridable:

- ``nlist`` = the power of two nearest 4·√n (faiss's guideline is 4–16·√n), lowered so every list
  gets at least 39 training points (faiss's minimum);
- ``nprobe`` = nlist/32 (about 3 % of the lists are scanned per query), at least 8, at most nlist.

A GPU index is used when ``faiss.get_num_gpus() > 0`` (faiss-gpu is the optional ``[gpu]`` extra);
``IndexConfig.gpu=False`` forces CPU, ``True`` fails clearly where no GPU is visible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import faiss
import numpy as np

from data_pipeline.vector.validation import VectorInputError, clipped, embedding_matrix

INDEX_KINDS = ("auto", "flat", "ivf_flat", "ivf_pq")
MIN_POINTS_PER_LIST = 39


@dataclass(frozen=True)
class IndexConfig:
    kind: str = "auto"               # one of INDEX_KINDS
    flat_max: int = 100_000          # "auto" uses an exact Flat index up to this many vectors
    nlist: int | None = None         # IVF lists; None: default_nlist(n)
    nprobe: int | None = None        # IVF lists scanned per query; None: default_nprobe(nlist)
    pq_m: int = 16                   # IVF-PQ sub-quantizers (must divide the dimension)
    pq_bits: int = 8
    train_points_per_list: int = 64  # IVF training sample = nlist × this (capped at n)
    gpu: bool | None = None          # None: use a GPU when faiss sees one
    seed: int = 0


def default_nlist(n: int) -> int:
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    return max(1, min(nlist, n // MIN_POINTS_PER_LIST))


def default_nprobe(nlist: int) -> int:
    return min(nlist, max(8, nlist // 32))


def gpu_wanted(cfg: IndexConfig) -> bool:
    available = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    if cfg.gpu and not available:
        raise VectorInputError("index.gpu", "is true but faiss sees no GPU (install the [gpu] extra, faiss-gpu)")
    return available if cfg.gpu is None else cfg.gpu


def resolve_kind(n: int, cfg: IndexConfig) -> str:
    if cfg.kind not in INDEX_KINDS:
        raise VectorInputError("index.kind", f"must be one of {', '.join(INDEX_KINDS)}, got {cfg.kind!r}")
    if cfg.kind == "auto":
        return "flat" if n <= cfg.flat_max else "ivf_flat"
    return cfg.kind


@dataclass
class VectorIndex:
    """A built index plus the settings it was built with (worth recording next to the results)."""

    index: faiss.Index
    kind: str
    dim: int
    nlist: int | None = None
    nprobe: int | None = None
    on_gpu: bool = False
    _gpu_resources: object = field(default=None, repr=False)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int, *, argument: str = "k") -> tuple[np.ndarray, np.ndarray]:
        """Top-k (cosine similarities, row ids), each (n_queries, k'), best first; k' = min(k, ntotal).

        ``queries`` must already be L2-normalized float32 of the index's dimension. Slots IVF could
        not fill (fewer than k vectors in the probed lists) have id -1 and similarity -inf.
        """
        k = clipped(k, self.ntotal, argument, "the number of indexed vectors")
        if queries.shape[1] != self.dim:
            raise VectorInputError("queries", f"have dimension {queries.shape[1]}, the index has {self.dim}")
        if len(queries) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        similarities, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        similarities[ids < 0] = -np.inf
        return similarities, ids


def build_index(vectors: np.ndarray, cfg: IndexConfig = IndexConfig(), *,
                argument: str = "vectors") -> VectorIndex:
    """Index the rows of ``vectors`` (normalized here) for cosine search; kind chosen by ``cfg``."""
    vectors = embedding_matrix(vectors, argument)
    n, dim = vectors.shape
    kind = resolve_kind(n, cfg)
    nlist = nprobe = None
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = clipped(cfg.nlist, n, "index.nlist", f"the number of {argument}") if cfg.nlist else default_nlist(n)
        nprobe = min(nlist, cfg.nprobe or default_nprobe(nlist))
        if kind == "ivf_pq" and dim % cfg.pq_m:
            raise VectorInputError("index.pq_m", f"{cfg.pq_m} does not divide the dimension {dim}")
        spec = f"IVF{nlist},Flat" if kind == "ivf_flat" else f"IVF{nlist},PQ{cfg.pq_m}x{cfg.pq_bits}"
        index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    resources = None
    on_gpu = gpu_wanted(cfg)
    if on_gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
    if nlist is not None:
        sample = training_sample(n, nlist * cfg.train_points_per_list, cfg.seed)
        index.train(vectors[sample])
        if on_gpu:
            index.nprobe = nprobe
        else:
            faiss.extract_index_ivf(index).nprobe = nprobe
    index.add(vectors)
    return VectorIndex(index, kind, dim, nlist, nprobe, on_gpu, resources)


def training_sample(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted row ids of a seeded uniform sample without replacement (all rows when size ≥ n)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
