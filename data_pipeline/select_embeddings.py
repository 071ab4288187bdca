"""Selection by embeddings: the enabled ``embedding`` stages over the rows ``select.decide`` kept.

Each stage sees only the rows still kept when its turn comes, adds its columns to the decisions
table (blank for rows it did not see) and gives its reason to the rows it drops. Fixed order:

  clip_score     image-text cosine, threshold or top fraction (DataComp)   clip_score_below_threshold /
                                                                           clip_score_not_in_top_fraction
  copy_dedup     copy-detection groups, one kept per group (DINOv2)        copy_duplicate
  semdedup       semantic duplicates within k-means clusters (SemDeDup)    semantic_duplicate
  decontaminate  too similar to an eval image (DINOv2)                     eval_contamination
  retrieval      not retrieved by the seed sets (LVD-142M)                 not_retrieved
  balance        not drawn by hierarchical balanced sampling (ssl-data-    not_sampled
                 curation)

Why this order: CLIP-score pruning is a per-row quality bar, so it comes before the stages that keep
one row per group (dedup run first could keep the one member CLIP score then drops, losing the
group); copy_dedup keeps the highest CLIP score of a group for the same reason. Exact copies go
before SemDeDup so its clusters are not crowded by them. Decontamination and retrieval follow
LVD-142M's order (dedup, remove eval near-duplicates, retrieve), so nothing retrieved is an eval
image; balanced sampling comes last because it draws a fixed-size sample, which any later filter
would shrink below its target.

All stages work on the CLIP image embeddings; the vector library (``data_pipeline.vector``) does the
work, this module only feeds it the surviving rows and records its verdicts. The library's warnings
(k or a cluster count clipped to a small pool, seeds that retrieve nothing) go to the log.
"""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import pandas as pd

from data_pipeline.config import EmbeddingConfig
from data_pipeline.embed_step import Embedded
from data_pipeline.registry import stage
from data_pipeline.stages.clip_score import select_by_clip_score
from data_pipeline.vector import (BalancedSamplingConfig, ClusterRetrievalConfig, CopyDedupConfig,
                                  DecontaminationConfig, HierarchicalKMeansConfig, IndexConfig, SampleRetrievalConfig,
                                  SemDedupConfig, balanced_sampling, copy_dedup, decontaminate, hierarchical_kmeans,
                                  retrieve_by_cluster, retrieve_by_sample, semdedup)



def select_by_embeddings(decisions: pd.DataFrame, pool: Embedded, eval_sets: Embedded | None,
                         seed_sets: list[Embedded], cfg: EmbeddingConfig,
                         log: Callable[[str], None] = print) -> pd.DataFrame:
    """Apply the enabled stages to ``decisions`` (from ``select.decide``); ``pool`` holds an embedding and
    a CLIP score for every kept row. Returns the decisions with each stage's columns and verdicts."""
    decisions = _with_clip_scores(decisions, pool, cfg, log)
    by_uid = pd.Series(np.arange(len(pool.ids)), index=pool.ids)
    stages = {"copy_dedup": lambda x, rows: _copy_dedup(x, rows, cfg, decisions),
              "semdedup": lambda x, rows: _semdedup(x, rows, cfg, decisions),
              "decontaminate": lambda x, rows: _decontaminate(x, eval_sets, cfg),
              "retrieval": lambda x, rows: _retrieval(x, seed_sets, cfg),
              "balance": lambda x, rows: _balance(x, cfg)}
    for name in cfg.enabled_stages():
        if name == "clip_score":
            continue
        rows = np.flatnonzero(decisions["kept"].to_numpy())
        if len(rows) == 0:
            log(f"{name}: no rows left to select from; skipped")
            continue
        vectors = pool.vectors[by_uid.loc[decisions["uid"].to_numpy()[rows]].to_numpy()]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            keep, columns = stages[name](vectors, rows)
        for warning in caught:
            log(f"{name}: warning: {warning.message}")
        decisions = _record(decisions, rows, keep, stage(name).reasons[0], columns)
        log(f"{name}: {int((~keep).sum())} of {len(rows)} rows dropped")
    return decisions


def _with_clip_scores(decisions: pd.DataFrame, pool: Embedded, cfg: EmbeddingConfig,
                      log: Callable[[str], None]) -> pd.DataFrame:
    """Every candidate's CLIP score as a column; the clip_score rule applied when enabled."""
    scores = pd.DataFrame({"uid": pool.ids, "clip_score": pool.clip_score})
    if not cfg.clip_score.enabled:
        return decisions.merge(scores, on="uid", how="left", validate="one_to_one")
    before = int(decisions["kept"].sum())
    out, cutoff = select_by_clip_score(decisions, scores, cfg.clip_score)
    log(f"clip_score: {before - int(out['kept'].sum())} of {before} rows dropped "
        f"(rule {cfg.clip_score.rule}, cutoff {cutoff:.4f})")
    return out


def _record(decisions: pd.DataFrame, rows: np.ndarray, keep: np.ndarray, reason: str,
            columns: dict[str, np.ndarray]) -> pd.DataFrame:
    """Drop ``rows[~keep]`` with ``reason``; add ``columns`` (values for ``rows``, blank elsewhere)."""
    decisions = decisions.copy()
    dropped = rows[~keep]
    decisions.loc[decisions.index[dropped], "reason"] = reason
    decisions.loc[decisions.index[dropped], "kept"] = False
    for name, values in columns.items():
        values = np.asarray(values)
        if values.dtype.kind in "iu":
            column = pd.array([pd.NA] * len(decisions), dtype="Int64")
        elif values.dtype.kind == "f":
            column = np.full(len(decisions), np.nan, dtype=np.float32)
        else:
            column = np.full(len(decisions), None, dtype=object)
        column[rows] = values
        decisions[name] = column
    return decisions


def _uids_of(decisions: pd.DataFrame, rows: np.ndarray, members: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The uid of ``rows[members]`` where ``valid``, else None."""
    uids = decisions["uid"].to_numpy()[rows[np.where(valid, members, 0)]].astype(object)
    uids[~valid] = None
    return uids


def _copy_dedup(x: np.ndarray, rows: np.ndarray, cfg: EmbeddingConfig, decisions: pd.DataFrame):
    quality = decisions["clip_score"].to_numpy(np.float64)[rows]  # the best caption match survives
    result = copy_dedup(x, CopyDedupConfig(k=cfg.copy_dedup.k, threshold=cfg.copy_dedup.threshold), quality)
    return result.keep, {
        "copy_duplicate_of": _uids_of(decisions, rows, result.representative, ~result.keep),
        "copy_group_size": result.component_size.astype(np.int64),
        "copy_similarity": result.similarity_to_representative.astype(np.float32)}


def _semdedup(x: np.ndarray, rows: np.ndarray, cfg: EmbeddingConfig, decisions: pd.DataFrame):
    stage = cfg.semdedup
    scores = decisions["clip_score"].to_numpy(np.float64)[rows] if stage.keep == "clip_score" else None
    result = semdedup(x, SemDedupConfig(n_clusters=stage.n_clusters, epsilon=stage.epsilon,
                                        keep="score" if stage.keep == "clip_score" else stage.keep,
                                        compare_with=stage.compare_with, kmeans_iterations=stage.kmeans_iterations,
                                        seed=stage.seed), scores)
    similarity = np.where(np.isfinite(result.max_similarity), result.max_similarity, np.nan).astype(np.float32)
    return result.keep, {
        "semdedup_cluster": result.cluster.astype(np.int64),
        "semdedup_duplicate_of": _uids_of(decisions, rows, result.most_similar, ~result.keep),
        "semdedup_similarity": similarity}


def _decontaminate(x: np.ndarray, eval_sets: Embedded, cfg: EmbeddingConfig):
    result = decontaminate(x, eval_sets.vectors, DecontaminationConfig(threshold=cfg.decontaminate.threshold))
    return result.keep, {"eval_similarity": result.similarity.astype(np.float32),
                         "nearest_eval": eval_sets.ids[result.nearest_eval]}


def _retrieval(x: np.ndarray, seed_sets: list[Embedded], cfg: EmbeddingConfig):
    """Retrieval per seed set (LVD-142M caps each set on its own); a row is kept when any set retrieves it."""
    stage = cfg.retrieval
    keep = np.zeros(len(x), bool)
    if stage.mode == "sample":
        hits = np.zeros(len(x), np.int64)
        best = np.full(len(x), -np.inf, np.float32)
        best_seed = np.full(len(x), None, dtype=object)
        for seeds in seed_sets:
            result = retrieve_by_sample(x, seeds.vectors, SampleRetrievalConfig(
                k=stage.k, min_similarity=stage.min_similarity, index=IndexConfig(kind=stage.index)))
            keep |= result.keep
            hits += result.seed_hits
            better = result.best_similarity > best
            best[better] = result.best_similarity[better]
            best_seed[better] = seeds.ids[result.best_seed[better]]
        return keep, {"seed_hits": hits, "seed_similarity": np.where(np.isfinite(best), best, np.nan),
                      "best_seed": best_seed}
    cluster_seeds = np.zeros(len(x), np.int64)
    for seeds in seed_sets:
        result = retrieve_by_cluster(x, seeds.vectors, ClusterRetrievalConfig(
            n_clusters=stage.n_clusters, min_seeds=stage.min_seeds, per_cluster=stage.per_cluster,
            max_total=stage.max_total, pick=stage.pick, seed=stage.seed))
        keep |= result.keep
        cluster_seeds += result.cluster_seeds
    # Every seed set clusters the same pool with the same seed: one clustering to report.
    return keep, {"retrieval_cluster": result.cluster.astype(np.int64), "cluster_seeds": cluster_seeds}


def _balance(x: np.ndarray, cfg: EmbeddingConfig):
    stage = cfg.balance
    hierarchy = hierarchical_kmeans(x, HierarchicalKMeansConfig(
        n_clusters=tuple(stage.n_clusters), resample_size=tuple(stage.resample_size),
        resampling_steps=stage.resampling_steps, resample_pick=stage.resample_pick, spherical=stage.spherical,
        kmeans_iterations=stage.kmeans_iterations, seed=stage.seed))
    result = balanced_sampling(hierarchy, BalancedSamplingConfig(target_size=stage.target_size, pick=stage.pick,
                                                                 seed=stage.seed))
    return result.keep, {"balance_leaf_cluster": result.leaf_cluster.astype(np.int64),
                         "balance_top_cluster": result.top_cluster.astype(np.int64)}
