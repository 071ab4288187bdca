"""Final selection: the one place that decides keep or drop, and records every decision.

A row's reason is the first problem in pipeline order: reading/decoding (reason_validate), then the
heuristic rules in their order, then deduplication, then (when configured) the embedding stages of
``select_embeddings``. kept = no reason. Nothing is dropped silently:
decisions.parquet has one row per row read, so kept + rejected = read.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd

from data_pipeline.stages.heuristics import RULES

STAGES = ("read", "validate", "heuristics", "exact_dedup", "near_dedup")
DECISION_COLUMNS = [
    "uid", "sha256", "source", "file", "key", "kept", "reason", "duplicate_of", "notes",
    "width", "height", "image_format", "image_mode", "file_bytes", "url",
    "caption_chars", "caption_words", "min_side", "aspect_ratio", "language", "language_confidence",
    "repeated_word_fraction", "symbol_fraction",
    *(f"flag_{rule}" for rule in RULES),
]


def eligible_for_dedup(rows: pd.DataFrame) -> pd.Series:
    return rows["reason_validate"].isna() & rows["reason_heuristics"].isna()


def decide(rows: pd.DataFrame, duplicates: pd.DataFrame) -> pd.DataFrame:
    """rows: every scored row (no image bytes needed); duplicates: uid, reason_dedup, duplicate_of."""
    table = rows.merge(duplicates, on="uid", how="left", validate="one_to_one")
    reason = table["reason_validate"].fillna(table["reason_heuristics"]).fillna(table["reason_dedup"])
    table["reason"] = reason.astype(object).where(reason.notna(), None)
    table["kept"] = table["reason"].isna()
    table["duplicate_of"] = table["duplicate_of"].astype(object).where(table["duplicate_of"].notna(), None)
    return table[DECISION_COLUMNS]


def funnel(decisions: pd.DataFrame, later_stages: Sequence[tuple[str, tuple[str, ...]]] = ()) -> dict:
    """Rows left after each stage, and how many rows each reason rejected (they add up).

    ``later_stages``: (stage, its reasons) of the stages after near_dedup, in order (the enabled
    embedding stages, ``select_embeddings.funnel_stages``)."""
    reasons = decisions["reason"]
    later_reasons = [reason for _, stage_reasons in later_stages for reason in stage_reasons]
    known = (*RULES, *_DEDUP_REASONS, *later_reasons)
    validate_fail = reasons.notna() & ~reasons.isin(known)
    heuristic_fail = reasons.isin(RULES)
    exact = reasons.isin(("exact_duplicate_image", "exact_duplicate_pair"))
    near = reasons == "near_duplicate"
    read = len(decisions)
    after = {"read": read}
    after["validate"] = read - int(validate_fail.sum())
    after["heuristics"] = after["validate"] - int(heuristic_fail.sum())
    after["exact_dedup"] = after["heuristics"] - int(exact.sum())
    after["near_dedup"] = after["exact_dedup"] - int(near.sum())
    left = after["near_dedup"]
    for stage, stage_reasons in later_stages:
        left -= int(reasons.isin(stage_reasons).sum())
        after[stage] = left
    return {
        "rows": {**after, "kept": int(decisions["kept"].sum())},
        "rejected_by_reason": {k: int(v) for k, v in reasons.value_counts().sort_index().items()},
        # Each rule's own verdict, also on rows an earlier rule already rejected.
        "flagged_by_rule": {rule: int(decisions[f"flag_{rule}"].sum()) for rule in RULES},
    }


_DEDUP_REASONS = ("exact_duplicate_image", "exact_duplicate_pair", "near_duplicate")
