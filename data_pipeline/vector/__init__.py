"""Vector-search curation stages over float32 embedding matrices (rows = samples), on FAISS.

Each stage is a plain function returning a per-sample result (keep flag, reason, deciding scores;
``.to_frame(uids)`` gives one row per sample for decisions.parquet):

- ``copy_dedup``: DINOv2 copy-detection dedup (k-NN graph, cosine > 0.6, connected components)
- ``decontaminate``: drop pool samples with cosine ≥ 0.45 to an eval image
- ``semdedup``: SemDeDup within spherical k-means clusters
- ``retrieve_by_sample`` / ``retrieve_by_cluster``: LVD-142M retrieval from a seed set
- ``hierarchical_kmeans`` + ``balanced_sampling``: ssl-data-curation balanced sampling

Each stage's config (``CopyDedupConfig``, ``SemDedupConfig``, ``DecontaminateConfig``, ``RetrievalConfig``,
``BalanceConfig``) is also its section of the curate YAML (``embedding.<stage>``): the pipeline loads it and
hands it over as it is. Its ``enabled``, retrieval's ``mode`` and the reference folders (``eval_sets``,
``seed_sets``) are read by the pipeline only. The search structures (``GraphConfig``, ``IndexConfig``) are the
library's own parameters, at their defaults in the pipeline (retrieval's ``index`` key picks only its kind).
"""
from data_pipeline.vector.balance import (BalanceConfig, BalancedSamplingResult, Hierarchy, balanced_sampling,
                                          hierarchical_kmeans)
from data_pipeline.vector.copy_dedup import CopyDedupConfig, CopyDedupResult, copy_dedup
from data_pipeline.vector.decontaminate import DecontaminateConfig, DecontaminationResult, decontaminate
from data_pipeline.vector.graph import GraphConfig, SimilarityGraph, similarity_graph
from data_pipeline.vector.index import IndexConfig, VectorIndex, build_index
from data_pipeline.vector.retrieval import (ClusterRetrievalResult, RetrievalConfig, SampleRetrievalResult,
                                            retrieve_by_cluster, retrieve_by_sample)
from data_pipeline.vector.semdedup import SemDedupConfig, SemDedupResult, semdedup
from data_pipeline.vector.validation import ClippedWarning, NoNeighboursWarning, VectorInputError

__all__ = [
    "BalanceConfig", "BalancedSamplingResult", "ClippedWarning", "ClusterRetrievalResult", "CopyDedupConfig",
    "CopyDedupResult", "DecontaminateConfig", "DecontaminationResult", "GraphConfig", "Hierarchy", "IndexConfig",
    "NoNeighboursWarning", "RetrievalConfig", "SampleRetrievalResult", "SemDedupConfig", "SemDedupResult",
    "SimilarityGraph", "VectorIndex", "VectorInputError", "balanced_sampling", "build_index", "copy_dedup",
    "decontaminate", "hierarchical_kmeans", "retrieve_by_cluster", "retrieve_by_sample", "semdedup",
    "similarity_graph",
]
