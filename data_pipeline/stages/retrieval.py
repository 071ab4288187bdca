"""The retrieval stage: keep only the candidates the seed sets retrieve (LVD-142M, ``vector.retrieval``).

Each seed set (a reference folder, embedded by the embed step) retrieves on its own, as LVD-142M
caps each set on its own; a row is kept when any set retrieves it. ``sample`` mode: each seed
image's k nearest candidates; ``cluster`` mode: the clusters the seeds fall into. Its config
section is the library's ``RetrievalConfig``.
"""
from __future__ import annotations

import numpy as np

from data_pipeline.candidates import Candidates, Verdict
from data_pipeline.vector.retrieval import REASON, RetrievalConfig, retrieve_by_cluster, retrieve_by_sample


def retrieval(candidates: Candidates, cfg: RetrievalConfig) -> Verdict:
    x = candidates.vectors
    keep = np.zeros(len(x), bool)
    if cfg.mode == "sample":
        hits = np.zeros(len(x), np.int64)
        best = np.full(len(x), -np.inf, np.float32)
        best_seed = np.full(len(x), None, dtype=object)
        for seeds in candidates.references:
            result = retrieve_by_sample(x, seeds.vectors, cfg)
            keep |= result.keep
            hits += result.seed_hits
            better = result.best_similarity > best
            best[better] = result.best_similarity[better]
            best_seed[better] = seeds.ids[result.best_seed[better]]
        similarity = np.where(np.isfinite(best), best, np.nan)
        return Verdict.of(keep, REASON, {"seed_hits": hits, "seed_similarity": similarity, "best_seed": best_seed})
    cluster_seeds = np.zeros(len(x), np.int64)
    for seeds in candidates.references:
        result = retrieve_by_cluster(x, seeds.vectors, cfg)
        keep |= result.keep
        cluster_seeds += result.cluster_seeds
    # Every seed set clusters the same pool with the same seed: one clustering to report.
    return Verdict.of(keep, REASON, {"retrieval_cluster": result.cluster.astype(np.int64),
                                     "cluster_seeds": cluster_seeds})
