"""Deduplication: exact (sha256 of the image bytes) and perceptual near duplicates.

Both are global (every row must meet every other), so they run over compact columns, about 300
bytes a row (``Compact``: uid, sha256, a caption digest, pixel and byte counts, the 192-byte grid
code); the thumbnails and content signatures that confirm a near-duplicate pair (5 kB a row) stay
where they are (``FingerprintSource``) and only the verification tasks read them, the rows of their
pairs at a time. The candidate search (``near_candidates``) and the verification
(``near_duplicates``) run as the executor's tasks.

Only rows that passed decode and heuristics take part: a rejected row must not remove the
acceptable copy of itself. Keep-one rule, the same for both kinds: rows are ranked by pixel count
(larger first), then file bytes (larger first), then uid (smaller first); going down that ranking,
a row is a duplicate when it matches a row already kept, and ``duplicate_of`` names that row.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from data_pipeline import fingerprints as fingerprint_files
from data_pipeline.config import DedupConfig
from data_pipeline.stages.content_signature import Signatures
from data_pipeline.stages.decode import THUMBNAIL_SIDE
from data_pipeline.stages.near_candidates import CellSearch, candidate_pairs, grid_codes
from data_pipeline.stages.near_duplicates import Fingerprints, NearDuplicateSearch, grid, serial_map, verify

VERIFY_PAIRS = 4096  # candidate pairs per verification task: bounds what one task holds (≈ 2 × 17 kB a pair)


@dataclass
class Compact:
    """The columns dedup needs, one entry per eligible row."""
    uid: np.ndarray  # object (str)
    sha256: np.ndarray  # object (hex str)
    caption: np.ndarray  # uint64 digest of the caption: exact pairs compare captions
    pixels: np.ndarray  # int64
    file_bytes: np.ndarray  # int64
    codes: np.ndarray  # (n, 192) uint8 grid codes (near_candidates)

    @classmethod
    def concat(cls, pieces: list[Compact]) -> Compact:
        return cls(*(np.concatenate([getattr(p, f) for p in pieces])
                     for f in ("uid", "sha256", "caption", "pixels", "file_bytes", "codes")))

    def __len__(self) -> int:
        return len(self.uid)


def caption_digest(captions) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b((c or "").encode(), digest_size=8).digest(), "little")
                     for c in captions], np.uint64)


def compact(rows: pd.DataFrame, codes: np.ndarray) -> Compact:
    """``rows``: uid, sha256, caption, width, height, file_bytes; ``codes``: their grid codes."""
    pixels = rows["width"].astype("int64").to_numpy() * rows["height"].astype("int64").to_numpy()
    return Compact(rows["uid"].to_numpy(object), rows["sha256"].to_numpy(object), caption_digest(rows["caption"]),
                   pixels, rows["file_bytes"].to_numpy(np.int64), codes)


@dataclass(frozen=True)
class InMemory:
    """Fingerprints held in memory (tests, benchmarks, small pools)."""
    fingerprints: Fingerprints

    def take(self, rows: np.ndarray) -> Fingerprints:
        signatures = self.fingerprints.signatures
        return Fingerprints(self.fingerprints.thumbnails[rows], Signatures(*(
            getattr(signatures, f)[rows] for f in ("bars", "content", "content_spread", "whole", "whole_spread"))))


@dataclass(frozen=True)
class OnDisk:
    """Fingerprints in the scored parts' fingerprint files: row r is record ``row[r]`` of part
    ``part[r]`` (an index into ``part_ids``)."""
    parts_dir: str
    part_ids: list[str]
    part: np.ndarray
    row: np.ndarray

    def take(self, rows: np.ndarray) -> Fingerprints:
        records = fingerprint_files.gather(Path(self.parts_dir), self.part_ids, self.part[rows], self.row[rows])
        signatures = fingerprint_files.signature_bytes(records["signature"], records["signature_len"])
        return Fingerprints(np.ascontiguousarray(records["thumbnail"]), Signatures.parse(signatures))


FingerprintSource = InMemory | OnDisk


def keep_order(table: Compact) -> np.ndarray:
    """Row positions in keep-one priority: most pixels, then most bytes, then smallest uid."""
    return np.lexsort((table.uid, -table.file_bytes, -table.pixels))


def find_duplicates(rows: pd.DataFrame, cfg: DedupConfig, map_shared: Callable = serial_map,
                    chunks: int = 1) -> pd.DataFrame:
    """``rows``: eligible rows with uid, sha256, caption, width, height, file_bytes, thumbnail, signature,
    all in memory. ``map_shared`` and ``chunks``: how the search and verification are spread.

    Returns uid, reason_dedup, duplicate_of for the rows found to be duplicates.
    """
    thumbnails = thumbnail_array(rows["thumbnail"])
    source = InMemory(Fingerprints(thumbnails, Signatures.parse(rows["signature"])))
    return duplicates_of(compact(rows, grid_codes(grid(thumbnails))), source, cfg, map_shared, chunks)


def duplicates_of(table: Compact, source: FingerprintSource, cfg: DedupConfig, map_shared: Callable = serial_map,
                  chunks: int = 1) -> pd.DataFrame:
    """The rows of ``table`` (its fingerprints in ``source``, same order) found to be duplicates:
    uid, reason_dedup, duplicate_of."""
    order = keep_order(table)
    uid = table.uid[order]
    found: list[pd.DataFrame] = []
    survivors = np.ones(len(order), dtype=bool)
    if cfg.exact and len(order):
        group = pd.factorize(table.sha256[order])[0]
        head = np.unique(group, return_index=True)[1][group]  # each row's first position with its sha256
        first = head != np.arange(len(order))
        caption = table.caption[order]
        same_caption = caption[first] == caption[head[first]]
        found.append(pd.DataFrame({"uid": uid[first], "reason_dedup": np.where(
            same_caption, "exact_duplicate_pair", "exact_duplicate_image"), "duplicate_of": uid[head[first]]}))
        survivors &= ~first
    if cfg.near:
        candidates = np.flatnonzero(survivors)  # positions in keep order
        rows = order[candidates]  # their rows in table / source
        search = NearDuplicateSearch(cfg.neighbours, cfg.max_crop, cfg.coarse_residual, cfg.max_residual,
                                     cfg.max_content_distance)
        pairs = candidate_pairs(table.codes[rows], cfg.neighbours, CellSearch(cfg.cell_rows, cfg.probes),
                                map_shared, chunks)
        same = verified(pairs, rows, table.pixels, source, search, map_shared, chunks)
        match = near_duplicate_of(pairs[same], len(candidates))
        hit = match >= 0
        found.append(pd.DataFrame({"uid": uid[candidates[hit]], "reason_dedup": "near_duplicate",
                                   "duplicate_of": uid[candidates[match[hit]]]}))
    frame = pd.concat(found, ignore_index=True) if found else pd.DataFrame()
    return frame.reindex(columns=["uid", "reason_dedup", "duplicate_of"]).astype(object)


def verified(pairs: np.ndarray, rows: np.ndarray, pixels: np.ndarray, source: FingerprintSource,
             search: NearDuplicateSearch, map_shared: Callable, chunks: int) -> np.ndarray:
    """Which candidate pairs (positions into ``rows``, whose entries index ``source``) are near
    duplicates; verified in tasks of at most ``VERIFY_PAIRS`` pairs, at least ``chunks`` of them."""
    first_larger = pixels[rows[pairs[:, 0]]] >= pixels[rows[pairs[:, 1]]]
    larger = rows[np.where(first_larger, pairs[:, 0], pairs[:, 1])]
    smaller = rows[np.where(first_larger, pairs[:, 1], pairs[:, 0])]
    pieces = max(chunks, -(-len(pairs) // VERIFY_PAIRS))
    items = [(larger[part], smaller[part], search) for part in np.array_split(np.arange(len(pairs)), pieces)]
    return np.concatenate([np.zeros(0, bool), *map_shared(_verify_piece, source, items)])


def _verify_piece(source: FingerprintSource, larger: np.ndarray, smaller: np.ndarray,
                  search: NearDuplicateSearch) -> np.ndarray:
    """One verification task: read the fingerprints of its pairs' rows only, then ``verify``."""
    if len(larger) == 0:
        return np.zeros(0, bool)
    needed, local = np.unique(np.concatenate([larger, smaller]), return_inverse=True)
    return verify(source.take(needed), local[:len(larger)], local[len(larger):], search)


def thumbnail_array(thumbnails: pd.Series) -> np.ndarray:
    """The decode stage's thumbnail bytes as one (n, side, side, 3) uint8 array."""
    return np.frombuffer(b"".join(thumbnails), np.uint8).reshape(len(thumbnails), THUMBNAIL_SIDE, THUMBNAIL_SIDE, 3)


def near_duplicate_of(pairs: np.ndarray, n: int) -> np.ndarray:
    """For rows in keep order and matching index pairs: the kept row each row duplicates, or -1.

    Going down the order, a row is a duplicate of the first earlier row it matches that was kept.
    """
    earlier, later = pairs.min(axis=1), pairs.max(axis=1)
    order = np.lexsort((earlier, later))
    earlier, later = earlier[order], later[order]
    starts = np.searchsorted(later, np.arange(n + 1))
    duplicate_of = np.full(n, -1, dtype=np.int64)
    for i in np.unique(later):
        kept = [j for j in earlier[starts[i]:starts[i + 1]] if duplicate_of[j] < 0]
        if kept:
            duplicate_of[i] = kept[0]
    return duplicate_of
