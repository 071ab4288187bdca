"""The write step's outputs built piece by piece, so the driver holds one piece, not the pool.

``DecisionsFile``: ``decisions.parquet`` as one file (readers see it as before), written a row group
per piece; ``ShardPlanner``: shard plans cut from the kept rows as they come, each written to a
JSON-lines file as soon as it is full, with a digest of the whole plan (what decides whether the
shards on disk can be reused) and each plan's byte offset: a shard's writer reads its own plan
(``shards.write_shard_run``), so the driver never holds the kept rows' uids.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.select import tally
from data_pipeline.shards import ShardPlan
from vlmtrain import atomic


def decisions_schema(sample: pd.DataFrame) -> pa.Schema:
    """The decisions' arrow schema from a piece of them; a column no row of the piece fills (all None)
    is a string column (every object column of the decisions holds strings)."""
    schema = pa.Schema.from_pandas(sample, preserve_index=False)
    for i, column in enumerate(schema):
        if pa.types.is_null(column.type):
            schema = schema.set(i, pa.field(column.name, pa.string()))
    return schema


class DecisionsFile:
    """``decisions.parquet`` written atomically, one row group per ``write``; ``counts``: their tally."""

    def __init__(self, path: Path):
        self.path = path
        self.counts: Counter = Counter()
        self._replacing = atomic.replacing(path)
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None

    def __enter__(self) -> DecisionsFile:
        self._tmp = self._replacing.__enter__()
        return self

    def write(self, decisions: pd.DataFrame) -> None:
        if self._writer is None:
            self._schema = decisions_schema(decisions)
            self._writer = pq.ParquetWriter(self._tmp, self._schema)
        self._writer.write_table(pa.Table.from_pandas(decisions, schema=self._schema, preserve_index=False))
        self.counts += tally(decisions)

    def __exit__(self, *error) -> None:
        if self._writer is not None:
            self._writer.close()
        elif error[0] is None:  # no rows at all: an empty table with the decisions' columns
            raise ValueError("DecisionsFile needs at least one write (an empty frame gives the columns)")
        self._replacing.__exit__(*error)


class ShardPlanner:
    """Cuts the kept rows, in output order, into shards of ``per_shard``; full plans go to ``path``
    (JSON lines) at once, so only the shard being filled is held."""

    def __init__(self, path: Path, per_shard: int):
        self.path, self.per_shard = path, per_shard
        self.count = 0
        self.offsets: list[int] = []  # byte offset of each plan in the file
        self._written = 0
        self._digest = hashlib.sha256()
        self._members: dict[str, list[str]] = {}
        self._filled = 0
        self._replacing = atomic.replacing(path)

    def __enter__(self) -> ShardPlanner:
        self._handle = open(self._replacing.__enter__(), "wb")
        return self

    def add(self, part_id: str, uids: list[str]) -> None:
        while uids:
            room = self.per_shard - self._filled
            self._members.setdefault(part_id, []).extend(uids[:room])
            self._filled += len(uids[:room])
            uids = uids[room:]
            if self._filled == self.per_shard:
                self._flush()

    def _flush(self) -> None:
        line = (json.dumps(asdict(ShardPlan(f"shard-{self.count:06d}.tar", self._members)), sort_keys=True)
                + "\n").encode()
        self._handle.write(line)
        self._digest.update(line)
        self.offsets.append(self._written)
        self._written += len(line)
        self.count += 1
        self._members, self._filled = {}, 0

    @property
    def digest(self) -> str:
        return self._digest.hexdigest()

    def __exit__(self, *error) -> None:
        if self._filled and error[0] is None:
            self._flush()
        self._handle.close()
        self._replacing.__exit__(*error)
