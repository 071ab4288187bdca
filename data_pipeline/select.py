"""Final selection: the one place that decides keep or drop, and records every decision.

A row's reason is the first problem in pipeline order (``registry``): the row-wise stages'
(reason_validate: reading/decoding, reason_heuristics: the rules in their order), then deduplication,
then (when configured) the embedding stages of ``select_embeddings``. kept = no reason. Nothing is dropped silently:
decisions.parquet has one row per row read, so kept + rejected = read.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import pandas as pd

from data_pipeline.registry import Stage, row_reason, run_stages
from data_pipeline.stages.heuristics import RULES

DECISION_COLUMNS = [
    "uid", "sha256", "source", "file", "key", "kept", "reason", "duplicate_of", "notes",
    "width", "height", "image_format", "image_mode", "file_bytes", "url",
    "caption_chars", "caption_words", "min_side", "aspect_ratio", "language", "language_confidence",
    "repeated_word_fraction", "symbol_fraction",
    *(f"flag_{rule}" for rule in RULES),
]


def eligible_for_dedup(rows: pd.DataFrame) -> pd.Series:
    return row_reason(rows).isna()


def decide(rows: pd.DataFrame, duplicates: pd.DataFrame) -> pd.DataFrame:
    """rows: every scored row (no image bytes needed); duplicates: uid, reason_dedup, duplicate_of."""
    table = rows.merge(duplicates, on="uid", how="left", validate="one_to_one")
    reason = row_reason(table).fillna(table["reason_dedup"])
    table["reason"] = reason.astype(object).where(reason.notna(), None)
    table["kept"] = table["reason"].isna()
    table["duplicate_of"] = table["duplicate_of"].astype(object).where(table["duplicate_of"].notna(), None)
    return table[DECISION_COLUMNS]


def tally(decisions: pd.DataFrame) -> Counter:
    """What the funnel counts in a piece of the decisions; the tallies of pieces add up (``+``)."""
    counts = Counter({"read": len(decisions), "kept": int(decisions["kept"].sum())})
    counts.update({("reason", k): int(v) for k, v in decisions["reason"].value_counts().items()})
    counts.update({("flag", rule): int(decisions[f"flag_{rule}"].sum()) for rule in RULES})
    return counts


def funnel(decisions: pd.DataFrame, stages: Sequence[Stage] | None = None) -> dict:
    """Rows left after each stage, and how many rows each reason rejected (they add up).

    ``stages``: the run's stages in order (``registry.run_stages``; default: those without embeddings)."""
    return funnel_of(tally(decisions), stages)


def funnel_of(counts: Counter, stages: Sequence[Stage] | None = None) -> dict:
    """``funnel`` from the summed tallies of the decisions' pieces."""
    stages = run_stages() if stages is None else stages
    reasons = {key[1]: n for key, n in counts.items() if isinstance(key, tuple) and key[0] == "reason" and n}
    declared = {reason for s in stages for reason in s.reasons}
    left = counts["read"]
    after = {"read": left}
    for stage in stages:
        left -= sum(n for reason, n in reasons.items()
                    if (reason in stage.reasons if stage.reasons else reason not in declared))
        after[stage.name] = left
    return {
        "rows": {**after, "kept": counts["kept"]},
        "rejected_by_reason": dict(sorted(reasons.items())),
        # Each rule's own verdict, also on rows an earlier rule already rejected.
        "flagged_by_rule": {rule: counts[("flag", rule)] for rule in RULES},
    }
