"""Readers: every input format becomes the same raw pandas batch, one batch per input file ("part").

Columns of a raw batch (one row per sample, nothing dropped):
  uid          stable id: hash of (source label, file name, key, occurrence of the key in the file)
  source, file, key
  image        image bytes, or None when the sample has none
  image_ext    the extension/field the image came under ("jpg", "png", ...), for mismatch checks
  sha256       sha256 hex of the image bytes (None without an image)
  caption_raw  caption bytes (UTF-8 expected; decoded later so a bad caption is a reason, not a crash)
  json_raw     metadata bytes (webdataset json sidecar), or None
  url          the sample's URL when the format carries one in a column
  read_error   why reading this sample failed (truncated tar, duplicate key, bad jsonl line, ...)
Readers never raise on bad content: what cannot be read becomes a row with a read_error (an
oversized member or image file, an image path leading outside image_root, JSON nested too deep).
A tar cut off inside a header yields the samples before it; the cut is reported per file.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd
import pyarrow.parquet as pq

from data_pipeline.config import SourceConfig
from vlmtrain.errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
CAPTION_EXTS = ("txt", "caption")
RAW_COLUMNS = ("uid", "source", "file", "key", "image", "image_ext", "sha256", "caption_raw", "json_raw",
               "url", "read_error")
_SUFFIXES = {"webdataset": ".tar", "parquet": ".parquet", "jsonl": ".jsonl"}


class SourceError(UserError):
    """A source that names no readable files (wrong path, empty directory)."""


@dataclass(frozen=True)
class Part:
    """One input file of one source: the unit of parallel work and of resuming."""
    part_id: str
    source_index: int
    path: str


def list_parts(sources: list[SourceConfig]) -> list[Part]:
    parts = []
    for index, source in enumerate(sources):
        files = _source_files(source, f"sources[{index}].path")
        parts += [Part(f"s{index}-{n:05d}-{Path(f).stem}", index, f) for n, f in enumerate(files)]
    return parts


def _source_files(source: SourceConfig, key: str) -> list[str]:
    suffix = _SUFFIXES[source.format]
    path = Path(source.path)
    if path.is_dir():
        files = sorted(str(p) for p in path.glob(f"*{suffix}"))
    elif path.is_file():
        files = [str(path)]
    else:
        files = sorted(glob.glob(source.path))
    if not files:
        raise SourceError(f"{key}: no {suffix} files at {source.path!r} (format {source.format})")
    return files


def read_part(part: Part, source: SourceConfig) -> pd.DataFrame:
    reader = {"webdataset": _read_tar, "parquet": _read_parquet, "jsonl": _read_jsonl}[source.format]
    rows = [{column: row.get(column) for column in RAW_COLUMNS} for row in reader(part.path, source)]
    label, name = source.label(), Path(part.path).name
    seen: dict[str, int] = {}
    for row in rows:
        occurrence = seen.get(row["key"], 0)
        seen[row["key"]] = occurrence + 1
        if occurrence and not row.get("read_error"):
            row["read_error"] = "duplicate_key"  # the first sample under a key wins
        row["uid"] = _uid(label, name, row["key"], occurrence)
        row["source"], row["file"] = label, name
        image = row.get("image")
        row["sha256"] = hashlib.sha256(image).hexdigest() if image is not None else None
    return pd.DataFrame(rows, columns=list(RAW_COLUMNS))


def _uid(source: str, file: str, key: str, occurrence: int) -> str:
    return hashlib.sha1(f"{source}\n{file}\n{key}\n{occurrence}".encode()).hexdigest()[:24]


# ------------------------------------------------------------------ webdataset tars


def _read_tar(path: str, source: SourceConfig) -> Iterator[dict]:
    """Group consecutive tar members by key (webdataset: name up to the first dot of the basename)."""
    current: dict | None = None
    for name, data, error in _tar_members(path, source.max_member_bytes):
        if error is not None and error != MEMBER_TOO_LARGE:
            cut_key = _split_name(name)[0] if name is not None else None
            if current is not None and cut_key not in (None, current["key"]):
                yield current  # complete: the cut member starts the next sample
                current = None
            if current is None:
                current = {"key": cut_key or "<end of tar>"}
            current["read_error"] = error
            yield current
            return
        key, _, ext = _split_name(name)
        ext = ext.lower()
        if current is not None and (current["key"] != key or ext in current["_exts"]):
            yield current
            current = None
        if current is None:
            current = {"key": key, "_exts": set()}
        current["_exts"].add(ext)
        if error is not None:  # an oversized member rejects its sample; the next samples are read
            current["read_error"] = error
        elif ext in IMAGE_EXTS and current.get("image") is None:
            current["image"], current["image_ext"] = data, ext
        elif ext in CAPTION_EXTS and current.get("caption_raw") is None:
            current["caption_raw"] = data
        elif ext == "json":
            current["json_raw"] = data
    if current is not None:
        yield current


def _split_name(name: str) -> tuple[str, str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), dot, ext


MEMBER_TOO_LARGE = "tar_member_too_large"


def _tar_members(path: str, max_bytes: int) -> Iterator[tuple[str | None, bytes | None, str | None]]:
    """(name, bytes, None) per regular file, (name, None, MEMBER_TOO_LARGE) for one larger than
    ``max_bytes`` (skipped unread); a final (name or None, None, reason) if the tar is cut."""
    try:
        archive = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as err:
        yield None, None, f"unreadable_tar: {err}"
        return
    with archive:
        while True:
            try:
                member = archive.next()
            except (tarfile.TarError, EOFError, OSError):
                yield None, None, "truncated_tar"
                return
            if member is None:
                return
            if not member.isfile():
                continue
            if member.size > max_bytes:
                yield member.name, None, MEMBER_TOO_LARGE
                continue
            try:
                data = archive.extractfile(member).read()
            except (tarfile.TarError, EOFError, OSError):
                data = None
            if data is None or len(data) != member.size:
                yield member.name, None, "truncated_tar"
                return
            yield member.name, data, None


# ------------------------------------------------------------------ img2dataset parquet, jsonl + folder


def _read_parquet(path: str, source: SourceConfig) -> Iterator[dict]:
    """img2dataset's parquet output: image bytes in a column (``jpg``), or a path to an image file."""
    table = pq.read_table(path)
    image_column = _image_column(table.column_names, source)
    root = _image_root(path, source)
    for n, record in enumerate(table.to_pylist()):
        key = str(record.get("key") or n)
        row = {"key": key, "url": _str_or_none(record.get(source.url_column))}
        caption = record.get(source.caption_column)
        row["caption_raw"] = caption.encode() if isinstance(caption, str) else caption
        value = record.get(image_column) if image_column else None
        if isinstance(value, str):
            row.update(_image_file(root, value, source.max_file_bytes))
        else:
            row["image"], row["image_ext"] = value, image_column
        yield row


def _image_column(columns: list[str], source: SourceConfig) -> str | None:
    for name in (source.image_column, *IMAGE_EXTS, "image_path"):
        if name in columns:
            return name
    return None


def _read_jsonl(path: str, source: SourceConfig) -> Iterator[dict]:
    """One JSON object per line: ``{"image": "relative/path.jpg", "caption": ..., "url": ...}``."""
    root = _image_root(path, source)
    with open(path, "rb") as handle:
        for n, line in enumerate(_lines(handle, source.max_member_bytes)):
            if line is None:
                yield {"key": f"line-{n}", "read_error": "jsonl_line_too_large"}
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except (ValueError, RecursionError):  # RecursionError: hostile nesting ([[[[...]]]])
                yield {"key": f"line-{n}", "read_error": "invalid_jsonl_line"}
                continue
            row = {"key": str(record.get("key") or f"line-{n}"), "url": _str_or_none(record.get(source.url_column))}
            caption = record.get(source.caption_column)
            row["caption_raw"] = caption.encode() if isinstance(caption, str) else None
            image = record.get(source.image_column)
            if isinstance(image, str):
                row.update(_image_file(root, image, source.max_file_bytes))
            yield row


def _lines(handle, max_bytes: int) -> Iterator[bytes | None]:
    """Each line of a binary file, or None for one longer than ``max_bytes`` (skipped in 1 MiB reads)."""
    while line := handle.readline(max_bytes + 1):
        if len(line) <= max_bytes:
            yield line
            continue
        while line and not line.endswith(b"\n"):
            line = handle.readline(1 << 20)
        yield None


def _image_root(path: str, source: SourceConfig) -> Path:
    return Path(source.image_root or Path(path).parent).resolve()


def _image_file(root: Path, name: str, max_bytes: int) -> dict:
    """The image bytes of ``root/name``, or why not: only regular files under ``root`` (resolved, so
    ``..``, absolute paths and symlinks cannot lead out) and at most ``max_bytes`` are read."""
    try:
        path = (root / name).resolve()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a symlink loop
        return {"read_error": "image_path_invalid"}
    if not path.is_relative_to(root):
        return {"read_error": "image_path_outside_root"}
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it changes nothing for regular files.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                return {"read_error": "image_not_a_regular_file"}
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        return {"read_error": "image_file_not_found"}
    except (OSError, ValueError):
        return {"read_error": "image_file_unreadable"}
    if len(data) > max_bytes:
        return {"read_error": "image_file_too_large"}
    return {"image": data, "image_ext": Path(name).suffix.lstrip(".").lower()}


def _str_or_none(value) -> str | None:
    return value if isinstance(value, str) and value else None
