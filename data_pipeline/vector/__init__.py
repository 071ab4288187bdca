"""Vector-search curation stages over float32 embedding matrices (rows = samples), on FAISS.

Each stage is a plain function returning a per-sample result (keep flag, reason, deciding scores;
``.to_frame(uids)`` gives one row per sample for decisions.parquet):

- ``copy_dedup``: DINOv2 copy-detection dedup (k-NN graph, cosine > 0.6, connected components)
- ``decontaminate``: drop pool samples with cosine ≥ 0.45 to an eval image
- ``semdedup``: SemDeDup within spherical k-means clusters
- ``retrieve_by_sample`` / ``retrieve_by_cluster``: LVD-142M retrieval from a seed set
- ``hierarchical_kmeans`` + ``balanced_sampling``: ssl-data-curation balanced sampling
"""
from data_pipeline.vector.balance import (BalancedSamplingConfig, BalancedSamplingResult, Hierarchy,
                                          HierarchicalKMeansConfig, balanced_sampling, hierarchical_kmeans)
from data_pipeline.vector.copy_dedup import CopyDedupConfig, CopyDedupResult, copy_dedup
from data_pipeline.vector.decontaminate import DecontaminationConfig, DecontaminationResult, decontaminate
from data_pipeline.vector.graph import GraphConfig, SimilarityGraph, similarity_graph
from data_pipeline.vector.index import IndexConfig, VectorIndex, build_index
from data_pipeline.vector.retrieval import (ClusterRetrievalConfig, ClusterRetrievalResult, SampleRetrievalConfig,
                                            SampleRetrievalResult, retrieve_by_cluster, retrieve_by_sample)
from data_pipeline.vector.semdedup import SemDedupConfig, SemDedupResult, semdedup
from data_pipeline.vector.validation import ClippedWarning, NoNeighboursWarning, VectorInputError

__all__ = [
    "BalancedSamplingConfig", "BalancedSamplingResult", "ClippedWarning", "ClusterRetrievalConfig",
    "ClusterRetrievalResult", "CopyDedupConfig", "CopyDedupResult", "DecontaminationConfig",
    "DecontaminationResult", "GraphConfig", "Hierarchy", "HierarchicalKMeansConfig", "IndexConfig",
    "NoNeighboursWarning", "SampleRetrievalConfig", "SampleRetrievalResult", "SemDedupConfig", "SemDedupResult",
    "SimilarityGraph", "VectorIndex", "VectorInputError", "balanced_sampling", "build_index", "copy_dedup",
    "decontaminate", "hierarchical_kmeans", "retrieve_by_cluster", "retrieve_by_sample", "semdedup",
    "similarity_graph",
]
