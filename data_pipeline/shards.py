"""Webdataset shard writer, reader of finished shards, and run manifest.

Shards are planned as the kept rows stream by (``write_stream.ShardPlanner``: kept rows in read order,
``samples_per_shard`` each) and written independently (``write_shard_run``: a run of consecutive plans per
executor task), each to a temporary name and then renamed, so a shard file that exists is complete.
Tars use mtime 0 and fixed ownership: the same rows give byte-identical shards.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd
import pyarrow.parquet as pq

from vlmtrain import atomic

SHARD_COLUMNS = ["uid", "image", "image_out", "image_out_ext", "caption", "source", "file", "key", "sha256",
                 "width", "height", "url"]


def read_shard_members(path: str) -> Iterator[tuple[str, list[tuple[tarfile.TarInfo, bytes]]]]:
    """(key, [(member, bytes), ...]) per sample of a webdataset tar: consecutive ``<key>.<ext>`` files."""
    key, members = None, []
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            stem = Path(info.name).name.partition(".")[0]
            if members and stem != key:
                yield key, members
                members = []
            key = stem
            members.append((info, tar.extractfile(info).read()))
    if members:
        yield key, members


@dataclass(frozen=True)
class ShardPlan:
    name: str
    members: dict[str, list[str]]  # part_id → uids, in order


def write_shard(plan: ShardPlan, parts_dir: Path, out_dir: Path) -> dict:
    """Write one shard (skipped when a complete one exists) and return name, samples, bytes, sha256."""
    path = out_dir / plan.name
    if not path.exists():
        with atomic.replacing(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for part_id, uids in plan.members.items():
                rows = pq.read_table(parts_dir / f"{part_id}.parquet", columns=SHARD_COLUMNS).to_pandas()
                rows = rows.set_index("uid").loc[uids]
                for uid, row in rows.iterrows():
                    _add_sample(tar, uid, _sample(uid, row))
    return {"name": plan.name, "samples": sum(len(u) for u in plan.members.values()),
            "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def read_plans(path: Path, offset: int, count: int) -> list[ShardPlan]:
    """The ``count`` plans from byte ``offset`` of a ``write_stream.ShardPlanner`` file."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        raws = [json.loads(handle.readline()) for _ in range(count)]
    return [ShardPlan(raw["name"], raw["members"]) for raw in raws]


def write_shard_run(paths: tuple[str, str, str], offset: int, count: int) -> list[dict]:
    """Write the ``count`` consecutive shards whose plans start at byte ``offset`` of the plans file;
    ``paths``: the plans file, the scored parts' folder and the shards' folder. An executor task: it lives
    here so that a worker that writes imports this module only, not the pipeline's every stage."""
    plans_file, parts_dir, out_dir = map(Path, paths)
    return [write_shard(plan, parts_dir, out_dir) for plan in read_plans(plans_file, offset, count)]


def _sample(uid: str, row: pd.Series) -> dict:
    image = row["image_out"] if row["image_out"] is not None else row["image"]
    meta = {"uid": uid, "source": row["source"], "file": row["file"], "key": row["key"],
            "sha256": row["sha256"], "width": int(row["width"]), "height": int(row["height"]),
            "url": row["url"] if isinstance(row["url"], str) else None}
    return {"__key__": uid, row["image_out_ext"]: image, "txt": row["caption"].encode(),
            "json": json.dumps(meta, sort_keys=True).encode()}


def _add_sample(tar: tarfile.TarFile, key: str, sample: dict) -> None:
    """One webdataset sample: members ``<key>.<ext>`` in a row, with fixed metadata (mtime 0, no
    owner) so equal rows give equal bytes. Plain tarfile: importing webdataset would pull in torch
    (≈1.5 s in every Ray worker that writes)."""
    for ext, data in sample.items():
        if ext == "__key__":
            continue
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mode, info.mtime = len(data), 0o444, 0
        tar.addfile(info, io.BytesIO(data))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
