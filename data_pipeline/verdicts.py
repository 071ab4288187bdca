"""The global stages' verdicts in the dedup step: held a few bytes per candidate, written in row groups,
read back in step with the scored rows.

``GlobalVerdicts`` holds a reason code per candidate (0: kept; k: ``reasons[k - 1]``) and the stages'
columns as arrays (a ``References`` column as candidate positions), never a string per row: a
1M-row pool costs the driver megabytes, not a gigabyte. ``write`` stores the rows the stages decided
(dropped, or given a value) in ``.work/verdicts.parquet``: their (part, row), uid, ``reason_global``
and columns, uids read ``GROUP_ROWS`` rows at a time. ``VerdictReader`` hands the write step the
verdicts of each scored batch, both being in input order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.candidates import Candidates, References
from data_pipeline.registry import Stage, section_of
from data_pipeline.select import blank_column, run_stage
from data_pipeline.write_stream import decisions_schema
from vlmtrain import atomic

_POSITION = ["part", "row"]
GROUP_ROWS = 1 << 16  # decided rows whose uids are read, and written as one row group, at a time


@dataclass
class GlobalVerdicts:
    code: np.ndarray  # (n,) int16 per candidate: 0 kept, k: dropped for reasons[k - 1]
    reasons: list[str] = field(default_factory=list)
    columns: dict[str, np.ndarray | References] = field(default_factory=dict)  # (n,) each, blank where unseen

    @property
    def dropped(self) -> int:
        return int((self.code > 0).sum())

    def decided(self) -> np.ndarray:
        """Positions of the candidates a stage dropped or gave a value."""
        decided = self.code > 0
        for values in self.columns.values():
            decided |= values.position >= 0 if isinstance(values, References) else pd.notna(values)
        return np.flatnonzero(decided)

    def record(self, name: str, at: np.ndarray, values: Any) -> None:
        """Column ``name`` of a stage that saw the candidates at ``at``."""
        if isinstance(values, References):
            column = self.columns.setdefault(name, References(np.full(len(self.code), -1, np.int32))).position
            column[at] = np.where(values.position >= 0, at[np.maximum(values.position, 0)], -1)
            return
        values = np.asarray(values)
        if name not in self.columns:
            self.columns[name] = blank_column(values.dtype, len(self.code))
        self.columns[name][at] = values


def apply_global(stages: Sequence[Stage], candidates: Candidates, cfg: Any,
                 log: Callable[[str], None]) -> GlobalVerdicts:
    """Run the global ``stages`` in order, each over the candidates still kept when its turn comes."""
    verdicts = GlobalVerdicts(np.zeros(len(candidates), np.int16))
    for stage in stages:
        at = np.flatnonzero(verdicts.code == 0)
        if not len(at):
            log(f"{stage.name}: no rows left to select from; skipped")
            continue
        seen = candidates if len(at) == len(candidates) else candidates.subset(at)
        verdict = run_stage(stage, seen, section_of(cfg, stage), log)
        del seen
        dropped = pd.notna(verdict.reason)
        for reason in pd.unique(verdict.reason[dropped]):
            if reason not in verdicts.reasons:
                verdicts.reasons.append(reason)
            verdicts.code[at[dropped & (verdict.reason == reason)]] = verdicts.reasons.index(reason) + 1
        for name, values in verdict.columns.items():
            verdicts.record(name, at, values)
        log(f"{stage.name}: {int(dropped.sum())} of {len(at)} rows dropped"
            + (f" ({verdict.note})" if verdict.note else ""))
        del verdict, dropped  # not held while the next stage runs
    return verdicts


def write(verdicts: GlobalVerdicts, candidates: Candidates, path: Path) -> None:
    """The decided rows to ``path`` (atomically), a row group per ``GROUP_ROWS`` of them."""
    decided = verdicts.decided()
    with atomic.replacing(path) as tmp:
        writer = None
        for start in range(0, max(len(decided), 1), GROUP_ROWS):
            frame = _frame(verdicts, candidates, decided[start:start + GROUP_ROWS])
            if writer is None:
                schema = decisions_schema(frame)
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False))
        writer.close()


def _frame(verdicts: GlobalVerdicts, candidates: Candidates, at: np.ndarray) -> pd.DataFrame:
    references = [values.position[at] for values in verdicts.columns.values() if isinstance(values, References)]
    named = np.concatenate([at, *references])
    uids = candidates.column_at(["uid"], named[named >= 0])["uid"].to_numpy(object)
    uid_of = dict(zip(named[named >= 0].tolist(), uids))
    reasons = np.array([None, *verdicts.reasons], object)
    frame = pd.DataFrame({"part": candidates.part[at], "row": candidates.row[at],
                          "uid": np.array([uid_of[p] for p in at.tolist()], object),
                          "reason_global": reasons[verdicts.code[at]]})
    for name, values in verdicts.columns.items():
        if isinstance(values, References):
            frame[name] = np.array([uid_of.get(p) for p in values.position[at].tolist()], object)
        else:
            frame[name] = values[at]
    return frame


def readable(path: Path) -> bool:
    """Whether ``path`` holds verdicts in this layout (earlier versions keyed them by uid alone)."""
    return path.is_file() and set(_POSITION) <= set(pq.read_schema(path).names)


class VerdictReader:
    """The verdicts of each scored batch in turn (``of``), read from ``path`` a row group at a time."""

    def __init__(self, path: Path):
        self._file = pq.ParquetFile(path)
        self._batches = self._file.iter_batches()
        self._pending = self._file.schema_arrow.empty_table().to_pandas()
        self._done = False

    def of(self, part: int, start: int, count: int) -> pd.DataFrame:
        """The verdicts of rows ``start .. start + count - 1`` of part ``part``, without their position; every
        earlier row's must have been asked for before."""
        end = (part, start + count)
        while not self._done and (self._pending.empty or _key(self._pending.iloc[-1]) < end):
            batch = next(self._batches, None)
            if batch is None:
                self._done = True
            else:
                self._pending = pd.concat([self._pending, batch.to_pandas()], ignore_index=True)
        inside = (self._pending["part"].to_numpy() < part) | (
            (self._pending["part"].to_numpy() == part) & (self._pending["row"].to_numpy() < start + count))
        found = self._pending[inside].drop(columns=_POSITION).reset_index(drop=True)
        self._pending = self._pending[~inside].reset_index(drop=True)
        return found


def _key(row: pd.Series) -> tuple[int, int]:
    return int(row["part"]), int(row["row"])
