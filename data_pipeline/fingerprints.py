"""What near-duplicate search reads of each scored row, in fixed-width files beside the parts.

The scoring step writes ``<part>.fingerprints.npy`` next to ``<part>.parquet``: one record per row
of the part, in its order: the 32×32 RGB thumbnail, the content signature (zero-padded, with its
length) and the 8×8 grid code of the candidate search (``near_candidates``); zeros for a row
without an image. Fixed width lets a verification task read the few rows it needs from any part
through a memory map instead of decoding whole parquet columns, and lets the candidate search read
192 bytes a row.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from data_pipeline.stages.content_signature import SIDE as SIGNATURE_SIDE
from data_pipeline.stages.decode import THUMBNAIL_SIDE
from data_pipeline.stages.near_candidates import CODE_DIM, grid_codes
from data_pipeline.stages.near_duplicates import grid
from vlmtrain import atomic

SIGNATURE_BYTES = 4 + 2 * (2 + SIGNATURE_SIDE * SIGNATURE_SIDE)  # bars + two parts (content_signature)
RECORD = np.dtype([("thumbnail", np.uint8, (THUMBNAIL_SIDE, THUMBNAIL_SIDE, 3)),
                   ("signature", np.uint8, (SIGNATURE_BYTES,)), ("signature_len", np.uint16),
                   ("code", np.uint8, (CODE_DIM,))])


def path_of(parts_dir: Path, part_id: str) -> Path:
    return parts_dir / f"{part_id}.fingerprints.npy"


def records(scored: pd.DataFrame) -> np.ndarray:
    """One record per row of a scored part (see the module docstring)."""
    out = np.zeros(len(scored), RECORD)
    has = np.array([t is not None for t in scored["thumbnail"]], bool)
    if has.any():
        thumbnails = np.frombuffer(b"".join(scored["thumbnail"][has]), np.uint8).reshape(
            -1, THUMBNAIL_SIDE, THUMBNAIL_SIDE, 3)
        out["thumbnail"][has] = thumbnails
        out["code"][has] = grid_codes(grid(thumbnails))
    for i, signature in enumerate(scored["signature"]):
        if signature is not None:
            out["signature"][i, :len(signature)] = np.frombuffer(signature, np.uint8)
            out["signature_len"][i] = len(signature)
    return out


def write(parts_dir: Path, part_id: str, scored: pd.DataFrame) -> None:
    with atomic.replacing(path_of(parts_dir, part_id)) as tmp, open(tmp, "wb") as handle:
        np.save(handle, records(scored))


def gather(parts_dir: Path, part_ids: list[str], part: np.ndarray, row: np.ndarray,
           field: str | None = None) -> np.ndarray:
    """The records (or their ``field``) at (part index, row in part) pairs, in that order; each part's
    file is mapped only while its rows are copied out, so what a task keeps is what it asked for."""
    dtype = RECORD if field is None else RECORD[field]
    out = np.empty((len(part), *dtype.shape), dtype.base)
    for index in np.unique(part):
        where = np.flatnonzero(part == index)
        mapped = np.load(path_of(parts_dir, part_ids[index]), mmap_mode="r")
        out[where] = mapped[row[where]] if field is None else mapped[field][row[where]]
        del mapped
    return out


def signature_bytes(padded: np.ndarray, lengths: np.ndarray) -> list[bytes]:
    return [row[:length].tobytes() for row, length in zip(padded, lengths)]
