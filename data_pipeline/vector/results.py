"""Per-sample results every vector stage returns: keep flag, reason (None when kept), deciding scores."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd


@dataclasses.dataclass
class PerSampleResult:
    keep: np.ndarray    # (n,) bool
    reason: np.ndarray  # (n,) object: None for kept rows, else the stage's reason string

    def to_frame(self, uids=None) -> pd.DataFrame:
        """One row per sample: ``row`` (position in the input), ``uid`` if given, and every
        per-sample field of the result (kept rows have reason None, as in decisions.parquet)."""
        n = len(self.keep)
        columns = {"row": np.arange(n)}
        if uids is not None:
            uids = np.asarray(uids)
            if uids.shape != (n,):
                raise ValueError(f"uids: expected {n} values (one per sample), got shape {uids.shape}")
            columns["uid"] = uids
        for field in dataclasses.fields(self):
            if not field.metadata.get("summary"):
                columns[field.name] = getattr(self, field.name)
        return pd.DataFrame(columns)


def summary():
    """A result field that is not one value per sample (left out of ``to_frame``)."""
    return dataclasses.field(repr=False, metadata={"summary": True})


def reasons(keep: np.ndarray, reason: str) -> np.ndarray:
    out = np.full(len(keep), None, dtype=object)
    out[~keep] = reason
    return out
