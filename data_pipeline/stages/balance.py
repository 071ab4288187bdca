"""The balance stage: a balanced sample of ``target_size`` candidates over a hierarchy of k-means
clusters (ssl-data-curation, ``vector.balance``). Last in the pipeline: it draws a fixed-size sample,
which any later filter would shrink below its target. Its config section is the library's ``BalanceConfig``."""
from __future__ import annotations

import numpy as np

from data_pipeline.candidates import Candidates, Verdict
from data_pipeline.vector.balance import REASON, BalanceConfig, balanced_sampling, hierarchical_kmeans


def balance(candidates: Candidates, cfg: BalanceConfig) -> Verdict:
    result = balanced_sampling(hierarchical_kmeans(candidates.vectors, cfg), cfg)
    return Verdict.of(result.keep, REASON, {"balance_leaf_cluster": result.leaf_cluster.astype(np.int64),
                                            "balance_top_cluster": result.top_cluster.astype(np.int64)})
