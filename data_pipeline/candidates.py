"""What a global stage sees (``Candidates``) and what it returns (``Verdict``).

A global stage decides over every row still kept when its turn comes (the candidates), in input
order: dedup must compare every row with every other, CLIP-score pruning ranks them all. It reads
what it needs of them itself, the scored columns part by part (``columns``), so a stage that needs
little holds little; an embedding stage also gets their CLIP embeddings and scores, and the
embeddings of its own reference folders. It returns a reason per candidate (None: kept) and the
columns it records in decisions.parquet; the pipeline applies the verdict, so no stage drops a row.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from data_pipeline.embed.store import Embedded


@dataclass(frozen=True)
class ScoredParts:
    """Where the score step left the rows: ``<dir>/<id>.parquet`` for each part id, in input order."""
    dir: str
    ids: list[str]
    stream_rows: int  # rows read at a time

    def path(self, index: int) -> Path:
        return Path(self.dir) / f"{self.ids[index]}.parquet"


@dataclass
class Candidates:
    """The rows a global stage decides on, in input order."""
    uid: np.ndarray  # (n,) object
    part: np.ndarray  # (n,) int32: index into ``parts.ids``
    row: np.ndarray  # (n,) int32: row within that part
    parts: ScoredParts
    map_shared: Callable  # the executor's: ``function(shared, *item)`` for each item, in parallel
    chunks: int  # tasks to spread one search over (1 in a plain run)
    vectors: np.ndarray | None = None  # embedding stages: (n, dim) float32 CLIP image embeddings
    clip_score: np.ndarray | None = None  # embedding stages: (n,) image-text cosine
    references: list[Embedded] = field(default_factory=list)  # the embeddings of the stage's reference folders

    def __len__(self) -> int:
        return len(self.uid)

    def subset(self, rows: np.ndarray) -> Candidates:
        """The candidates at ``rows`` (positions or a mask), in order."""
        taken = {name: getattr(self, name)[rows] for name in ("uid", "part", "row")}
        taken.update({name: getattr(self, name)[rows] for name in ("vectors", "clip_score")
                      if getattr(self, name) is not None})
        return replace(self, **taken)

    def columns(self, names: list[str]) -> Iterator[pd.DataFrame]:
        """The scored columns ``names`` of the candidates, in order, at most ``parts.stream_rows`` rows of a
        part at a time (so the caller decides what it keeps)."""
        for index in np.unique(self.part):
            rows = self.row[self.part == index]
            scored = pq.ParquetFile(self.parts.path(int(index)))
            start = 0
            for batch in scored.iter_batches(batch_size=self.parts.stream_rows, columns=names):
                wanted = rows[(rows >= start) & (rows < start + batch.num_rows)] - start
                if len(wanted):
                    yield batch.take(wanted).to_pandas()
                start += batch.num_rows

    def uid_of(self, members: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """The uid of candidate ``members[i]`` where ``valid[i]``, else None (e.g. whom a duplicate copies)."""
        uids = self.uid[np.where(valid, members, 0)].astype(object)
        uids[~valid] = None
        return uids


@dataclass
class Verdict:
    """A global stage's decision over its candidates: a reason per candidate (None: kept), the columns it
    records (one value per candidate; the rows it did not see stay blank), and a note for the log."""
    reason: np.ndarray  # (n,) object
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    note: str = ""

    @classmethod
    def of(cls, keep: np.ndarray, reason: str, columns: dict[str, np.ndarray] | None = None,
           note: str = "") -> Verdict:
        """``reason`` for every candidate not kept."""
        reasons = np.full(len(keep), None, dtype=object)
        reasons[~np.asarray(keep, bool)] = reason
        return cls(reasons, columns or {}, note)

    @classmethod
    def keep_all(cls, n: int) -> Verdict:
        return cls(np.full(n, None, dtype=object))
