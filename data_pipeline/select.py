"""Final selection: the one place that decides keep or drop, and records every decision.

A row's reason is the first problem in pipeline order (``registry``): the row stages'
(reason_validate: reading/decoding, reason_heuristics: the rules in their order), then the global
stages' (deduplication), then (when configured) the embedding stages'. kept = no reason. Nothing is
dropped silently: decisions.parquet has one row per row read, so kept + rejected = read.
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from data_pipeline.candidates import Candidates, References, Verdict
from data_pipeline.registry import Stage, row_reason, run_stages, section_of
from data_pipeline.stages.heuristics import RULES

DECISION_COLUMNS = [
    "uid", "sha256", "source", "file", "key", "kept", "reason", "duplicate_of", "notes",
    "width", "height", "image_format", "image_mode", "file_bytes", "url",
    "caption_chars", "caption_words", "min_side", "aspect_ratio", "language", "language_confidence",
    "repeated_word_fraction", "symbol_fraction",
    *(f"flag_{rule}" for rule in RULES),
]


def passed_row_stages(rows: pd.DataFrame) -> pd.Series:
    return row_reason(rows).isna()


def decide(rows: pd.DataFrame, verdicts: pd.DataFrame) -> pd.DataFrame:
    """rows: every scored row (no image bytes needed); verdicts: uid, reason_global and the global stages'
    columns (duplicate_of, ...) of the rows they decided (``apply_stages``)."""
    table = rows.merge(verdicts, on="uid", how="left", validate="one_to_one")
    reason = row_reason(table).fillna(table["reason_global"])
    table["reason"] = reason.astype(object).where(reason.notna(), None)
    table["kept"] = table["reason"].isna()
    extra = [c for c in verdicts.columns if c not in ("uid", "reason_global", *DECISION_COLUMNS)]
    table = table.reindex(columns=[*DECISION_COLUMNS, *extra])
    table["duplicate_of"] = table["duplicate_of"].astype(object).where(table["duplicate_of"].notna(), None)
    return table


def apply_stages(stages: Sequence[Stage], table: pd.DataFrame, at: np.ndarray, candidates: Candidates, cfg: Any,
                 log: Callable[[str], None], references: dict[str, list] | None = None) -> pd.DataFrame:
    """Run the embedding ``stages`` in order over ``candidates``, rows ``at`` of ``table``: each stage
    sees the candidates still kept when its turn comes. Returns ``table`` with their reasons (``reason``,
    ``kept``) and their columns (blank on the rows a stage did not see). The stages' warnings (k or a cluster
    count clipped to a small pool, seeds that retrieve nothing) go to the log. ``references``: stage name →
    the embeddings of its reference folders."""
    table = table.copy()
    for stage in stages:
        still = table["kept"].to_numpy()[at]
        if not still.any():
            log(f"{stage.name}: no rows left to select from; skipped")
            continue
        rows = at[still]
        seen = candidates.subset(still)
        seen.references = (references or {}).get(stage.name, [])
        verdict = run_stage(stage, seen, section_of(cfg, stage), log)
        dropped = pd.notna(verdict.reason)
        table.loc[table.index[rows[dropped]], "reason"] = verdict.reason[dropped]
        table.loc[table.index[rows[dropped]], "kept"] = False
        for name, values in verdict.columns.items():
            if isinstance(values, References):
                values = values.resolve(table["uid"].to_numpy(object)[rows])
            _record(table, name, rows, np.asarray(values))
        log(f"{stage.name}: {int(dropped.sum())} of {len(rows)} rows dropped"
            + (f" ({verdict.note})" if verdict.note else ""))
    return table


def run_stage(stage: Stage, seen: Candidates, section: Any, log: Callable[[str], None]) -> Verdict:
    """A global or embedding stage over ``seen``; its warnings (k or a cluster count clipped to a small pool,
    seeds that retrieve nothing) go to the log."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        verdict = stage.function(seen, section)
    for warning in caught:
        log(f"{stage.name}: warning: {warning.message}")
    return verdict


def _record(table: pd.DataFrame, name: str, rows: np.ndarray, values: np.ndarray) -> None:
    """Set column ``name`` at ``rows``; a new column is blank elsewhere (``blank_column``)."""
    if name in table:
        table.loc[table.index[rows], name] = values
        return
    column = blank_column(values.dtype, len(table))
    column[rows] = values
    table[name] = column


def blank_column(dtype: np.dtype, n: int):
    """A stage's column before its values are set: NA, NaN, False or None by type."""
    if dtype.kind in "iu":
        return pd.array([pd.NA] * n, dtype="Int64")
    if dtype.kind == "f":
        return np.full(n, np.nan, dtype=np.float32)
    if dtype.kind == "b":
        return np.zeros(n, dtype=bool)
    return np.full(n, None, dtype=object)


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
