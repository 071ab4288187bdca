"""What a run reads: input paths must lie outside its output directory, and each input file's fingerprint.

A fingerprint entry is the file's path, size and sha256 plus a cheap key (size, mtime_ns, inode). A
resumed run hashes again only the files whose cheap key changed, so an unchanged pool costs one
``stat`` per file; a file rewritten at the same size gets a new mtime (and, when replaced, a new
inode), so it is hashed again and its new content is seen. A file modified within the last second
may share its mtime with a rewrite to come (file times tick every few ms): its key is not recorded, so
the next run hashes it again (git's "racy clean" rule).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable

from data_pipeline.shards import file_sha256
from vlmtrain.errors import ConfigError

RACY_NS = 1_000_000_000


def refuse_inputs_inside(output_dir: str | Path, inputs: Iterable[tuple[str, str | Path]]) -> None:
    """ConfigError when an input (config key, path) lies inside ``output_dir``, which the run rewrites
    and prunes: the run would delete or overwrite what it reads."""
    out = Path(output_dir).resolve()
    for key, path in inputs:
        if path and Path(path).resolve().is_relative_to(out):
            raise ConfigError(f"{key}: {path} lies inside the output directory {out}, whose files the run "
                              f"replaces and deletes; move the input elsewhere or choose another output directory")


def cheap_key(path: str | Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def fingerprint(paths: Iterable[str], previous: list[dict] = ()) -> list[dict]:
    """One entry per file (path, size, sha256, key); a previous entry with the same key lends its hash."""
    known = {entry["path"]: entry for entry in previous if entry.get("key")}
    entries = []
    for path in paths:
        key = cheap_key(path)
        old = known.get(path)
        sha256 = old["sha256"] if old and old["key"] == key else file_sha256(Path(path))
        racy = time.time_ns() - key[1] < RACY_NS
        entries.append({"path": path, "size": key[0], "sha256": sha256, "key": None if racy else key})
    return entries


def content(entries: list[dict]) -> list[tuple[str, int, str]]:
    """What the entries say about the files' contents (the cheap keys left out)."""
    return [(entry["path"], entry["size"], entry["sha256"]) for entry in entries]
