"""What a global stage sees (``Candidates``) and what it returns (``Verdict``).

A global stage decides over every row still kept when its turn comes (the candidates), in input
order: dedup must compare every row with every other, CLIP-score pruning ranks them all. It reads
what it needs of them itself, the scored columns part by part (``columns``), so a stage that needs
little holds little; an embedding stage also gets their CLIP embeddings and scores, and the
embeddings of its own reference folders. It returns a reason per candidate (None: kept) and the
columns it records in decisions.parquet; the pipeline applies the verdict, so no stage drops a row.

A candidate is its (part, row) position, two int32s: the driver holds no string per row (a pool of
1M rows must not cost it a gigabyte). A stage reads uids only where it needs them (``column``,
``column_at``), and a column naming other candidates (whom a duplicate copies) is a ``References``:
their positions, written as their uids by the pipeline.
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


@dataclass(frozen=True)
class References:
    """A verdict column naming, per candidate, another candidate by its position (-1: none); the pipeline
    records that candidate's uid (None for -1)."""
    position: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.position)

    def resolve(self, uids: np.ndarray) -> np.ndarray:
        """The named candidates' ``uids`` (those of every candidate, in order); None where none is named."""
        out = np.full(len(self.position), None, object)
        named = self.position >= 0
        out[named] = uids[self.position[named]]
        return out


@dataclass
class Candidates:
    """The rows a global stage decides on, in input order: (part, row) positions, no uids."""
    part: np.ndarray  # (n,) int32: index into ``parts.ids``
    row: np.ndarray  # (n,) int32: row within that part
    parts: ScoredParts
    map_shared: Callable  # the executor's: ``function(shared, *item)`` for each item, in parallel
    chunks: int  # tasks to spread one search over (1 in a plain run)
    vectors: np.ndarray | None = None  # embedding stages: (n, dim) float32 CLIP image embeddings
    clip_score: np.ndarray | None = None  # embedding stages: (n,) image-text cosine
    references: list[Embedded] = field(default_factory=list)  # the embeddings of the stage's reference folders

    def __len__(self) -> int:
        return len(self.part)

    def subset(self, rows: np.ndarray) -> Candidates:
        """The candidates at ``rows`` (positions or a mask), in order."""
        taken = {name: getattr(self, name)[rows] for name in ("part", "row")}
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

    def column(self, name: str) -> np.ndarray:
        """One scored column of every candidate, in order (e.g. the uids, where a stage ranks by them)."""
        return np.concatenate([np.empty(0, object), *(rows[name].to_numpy() for rows in self.columns([name]))])

    def column_at(self, names: list[str], positions: np.ndarray) -> pd.DataFrame:
        """The scored columns ``names`` of the candidates at ``positions`` (any order, repeats allowed), in
        that order: what a stage reads of a few rows (its duplicates) without holding the pool's."""
        if len(positions) == 0:
            return pd.DataFrame({name: np.empty(0, object) for name in names})
        order = np.argsort(positions, kind="stable")
        taken = replace(self, part=self.part[positions[order]], row=self.row[positions[order]], vectors=None,
                        clip_score=None)
        pieces = list(taken.columns(names))
        found = pd.concat(pieces, ignore_index=True)
        return found.iloc[np.argsort(order, kind="stable")].reset_index(drop=True)

    def references_to(self, members: np.ndarray, valid: np.ndarray) -> References:
        """Candidate ``members[i]`` where ``valid[i]``, else none (e.g. whom a duplicate copies); the pipeline
        records their uids."""
        return References(np.where(valid, members, -1).astype(np.int64))


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
