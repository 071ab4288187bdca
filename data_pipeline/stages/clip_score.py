"""CLIP-score pruning: a named rule over the image-text cosine of the rows curation kept.

Like every stage it adds columns — ``clip_score``, ``flag_clip_score`` — and a reason; the
selection (``select_by_clip_score``) only turns the reason into ``kept = False``, so the decisions
table still has one row per row read and kept + rejected = read. Rows an earlier stage rejected
keep their reason and get no score.

As the embedding stage ``clip_score`` of ``vlm-curate run`` (``ClipScoreStageConfig``, section
``embedding.clip_score``) it decides over the rows heuristics and dedup kept (``clip_score``);
``vlm-curate bootstrap`` applies the same rule to a finished pool (``select_by_clip_score``).

Rules (``ClipScoreConfig.rule``):
  threshold     keep cosine ≥ threshold                      reason clip_score_below_threshold
  top_fraction  keep the ceil(fraction · n) best-scoring     reason clip_score_not_in_top_fraction
                rows (ties broken by uid), DataComp-style
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from data_pipeline.candidates import Candidates, Verdict

REASONS = {"threshold": "clip_score_below_threshold", "top_fraction": "clip_score_not_in_top_fraction"}
CLIP_SCORE_RULES = tuple(REASONS)


@dataclass
class ClipScoreConfig:
    """``threshold``: keep cosine ≥ ``threshold`` (DataComp: ≥ 0.25–0.28 with ViT-B/32); ``top_fraction``:
    keep the best-scoring ``top_fraction`` of the candidates (DataComp: top 30% by ViT-L/14)."""
    rule: str = field(default="top_fraction", metadata={"choices": CLIP_SCORE_RULES})
    threshold: float = field(default=0.25, metadata={"min": -1.0, "max": 1.0})
    top_fraction: float = field(default=0.3, metadata={"min": 0.0, "max": 1.0})


@dataclass
class ClipScoreStageConfig(ClipScoreConfig):
    enabled: bool = False


def clip_score(candidates: Candidates, cfg: ClipScoreConfig) -> Verdict:
    """The clip_score stage: the rule over the candidates' CLIP scores; ``flag_clip_score`` marks the rows it drops."""
    passes, cutoff = passes_clip_score(pd.DataFrame({"uid": candidates.column("uid"),
                                                    "clip_score": candidates.clip_score}), cfg)
    return Verdict.of(passes, REASONS[cfg.rule], {"flag_clip_score": ~passes},
                      note=f"rule {cfg.rule}, cutoff {cutoff:.4f}")


def passes_clip_score(scores: pd.DataFrame, cfg: ClipScoreConfig) -> tuple[np.ndarray, float]:
    """``scores``: uid, clip_score of the candidate rows → (passes per row, the score cutoff applied).

    The cutoff is the threshold, or for top_fraction the lowest score kept (NaN when none is kept).
    """
    values = scores["clip_score"].to_numpy(dtype=np.float64)
    if np.isnan(values).any():
        uid = scores["uid"].iloc[int(np.flatnonzero(np.isnan(values))[0])]
        raise ValueError(f"clip_score is NaN for uid {uid}: the embeddings of that sample are broken")
    if cfg.rule == "threshold":
        return values >= cfg.threshold, cfg.threshold
    keep_count = math.ceil(cfg.top_fraction * len(values))
    order = np.lexsort((scores["uid"].to_numpy(), -values))  # best first; equal scores by uid
    passes = np.zeros(len(values), dtype=bool)
    passes[order[:keep_count]] = True
    return passes, float(values[order[keep_count - 1]]) if keep_count else float("nan")


def select_by_clip_score(decisions: pd.DataFrame, scores: pd.DataFrame,
                         cfg: ClipScoreConfig) -> tuple[pd.DataFrame, float]:
    """Apply the rule to the kept rows of ``decisions`` (uid, kept, reason, ...).

    ``scores`` (uid, clip_score) must cover every kept row. Returns the decisions with
    ``clip_score``, ``flag_clip_score`` and the updated kept/reason, and the cutoff.
    """
    candidates = decisions.loc[decisions["kept"], ["uid"]]
    scored = candidates.merge(scores[["uid", "clip_score"]], on="uid", how="left", validate="one_to_one")
    missing = scored["clip_score"].isna()
    if missing.any():
        raise ValueError(f"{int(missing.sum())} kept row(s) have no CLIP score (first uid: "
                         f"{scored['uid'][missing].iloc[0]}): embed the whole pool first")
    passes, cutoff = passes_clip_score(scored, cfg)
    out = decisions.merge(scored, on="uid", how="left", validate="one_to_one")
    flagged = out["uid"].isin(scored["uid"][~passes])
    out["flag_clip_score"] = flagged
    reason = out["reason"].astype(object).where(~flagged, REASONS[cfg.rule])
    out["reason"] = reason.where(reason.notna(), None)  # None, as in select.decide, not NaN
    out["kept"] = out["kept"] & ~flagged
    return out, cutoff
