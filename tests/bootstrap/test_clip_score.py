"""Specification of CLIP-score pruning: a named rule that adds a score, a flag and a reason per row."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from data_pipeline.stages.clip_score import REASONS, ClipScoreConfig, select_by_clip_score


def pool_decisions(n_kept: int = 50, n_rejected: int = 7) -> pd.DataFrame:
    uids = [f"u{i:03d}" for i in range(n_kept + n_rejected)]
    kept = [True] * n_kept + [False] * n_rejected
    return pd.DataFrame({"uid": uids, "key": uids, "kept": kept,
                         "reason": [None] * n_kept + ["near_duplicate"] * n_rejected})


def scores_for(decisions: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    kept = decisions.loc[decisions["kept"], "uid"]
    return pd.DataFrame({"uid": kept, "clip_score": np.random.default_rng(seed).uniform(-0.2, 0.6, len(kept))})


def test_top_fraction_keeps_exactly_the_best_scoring_share_of_the_kept_rows():
    decisions, cfg = pool_decisions(), ClipScoreConfig(rule="top_fraction", top_fraction=0.3)
    scores = scores_for(decisions)
    out, cutoff = select_by_clip_score(decisions, scores, cfg)

    best = set(scores.sort_values("clip_score", ascending=False)["uid"][:math.ceil(0.3 * len(scores))])
    assert set(out.loc[out["kept"], "uid"]) == best  # brute force: sort and take the top 30%
    assert cutoff == pytest.approx(scores.loc[scores["uid"].isin(best), "clip_score"].min())
    removed = out[out["flag_clip_score"]]
    assert len(removed) == len(scores) - len(best)
    assert set(removed["reason"]) == {REASONS["top_fraction"]} == {"clip_score_not_in_top_fraction"}


def test_threshold_rule_records_a_score_and_a_reason_per_sample_and_loses_no_row():
    decisions, cfg = pool_decisions(), ClipScoreConfig(rule="threshold", threshold=0.25)
    scores = scores_for(decisions, seed=1)
    out, cutoff = select_by_clip_score(decisions, scores, cfg)

    assert cutoff == 0.25 and len(out) == len(decisions)  # kept + rejected = read
    by_uid = out.set_index("uid")
    for uid, score in zip(scores["uid"], scores["clip_score"]):
        assert by_uid.at[uid, "clip_score"] == pytest.approx(score)
        assert by_uid.at[uid, "kept"] == (score >= 0.25)
        assert by_uid.at[uid, "reason"] == (None if score >= 0.25 else "clip_score_below_threshold")
    earlier = out[~decisions["kept"].to_numpy()]
    assert (earlier["reason"] == "near_duplicate").all() and earlier["clip_score"].isna().all()
    assert not earlier["flag_clip_score"].any()


def test_a_kept_row_without_a_score_is_named():
    decisions = pool_decisions()
    scores = scores_for(decisions).iloc[1:]
    with pytest.raises(ValueError, match=r"1 kept row\(s\) have no CLIP score \(first uid: u000\)"):
        select_by_clip_score(decisions, scores, ClipScoreConfig())
