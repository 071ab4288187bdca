"""Deduplication, two global stages: exact (sha256 of the image bytes), then perceptual near duplicates.

Both must compare every row with every other, so they run over compact columns, about 300
bytes a row (``Compact``: uid, sha256, a caption digest, pixel and byte counts, the 192-byte grid
code); the thumbnails and content signatures that confirm a near-duplicate pair (5 kB a row) stay
where they are (``FingerprintSource``) and only the verification tasks read them, the rows of their
pairs at a time. The candidate search (``near_candidates``) and the verification
(``near_duplicates``) run as the executor's tasks.

Only rows that passed decode and heuristics take part (the stages' candidates), and near_dedup sees
only what exact_dedup kept: a rejected row must not remove the acceptable copy of itself. Keep-one rule, the same for both kinds: rows are ranked by pixel count
(larger first), then file bytes (larger first), then uid (smaller first); going down that ranking,
a row is a duplicate when it matches a row already kept, and ``duplicate_of`` names that row.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from data_pipeline import fingerprints as fingerprint_files
from data_pipeline.candidates import Candidates, Verdict
from data_pipeline.stages.content_signature import Signatures
from data_pipeline.stages.decode import THUMBNAIL_SIDE
from data_pipeline.stages.near_candidates import CellSearch, candidate_pairs, grid_codes
from data_pipeline.stages.near_duplicates import Fingerprints, NearDuplicateSearch, grid, serial_map, verify

VERIFY_PAIRS = 4096  # candidate pairs per verification task: bounds what one task holds (≈ 2 × 17 kB a pair)
EXACT_REASONS = ("exact_duplicate_image", "exact_duplicate_pair")
NEAR_DUPLICATE = "near_duplicate"
DEDUP_COLUMNS = ["sha256", "caption", "width", "height", "file_bytes"]  # with the uid


@dataclass
class DedupConfig:
    exact: bool = True  # same image bytes (sha256) → keep one
    near: bool = True
    # Near duplicates (re-encodes, resizes, crops up to `max_crop` a side): each row's `neighbours`
    # nearest rows by a colour thumbnail are aligned to it (the smaller image searched as a window
    # of the larger one); a pair is a duplicate when the aligned thumbnails differ by at most
    # `max_residual` RMS (0-255 levels), after a cheaper grey pre-check at `coarse_residual`, and
    # their content signatures (inside letterbox bars) differ by at most `max_content_distance`
    # (0: equal contents, ≈1: unrelated ones). See data_pipeline/stages/near_duplicates.py.
    neighbours: int = field(default=10, metadata={"min": 1})
    max_crop: float = field(default=0.1, metadata={"min": 0.0, "max": 0.4})
    coarse_residual: float = field(default=9.0, metadata={"min": 0.0})
    max_residual: float = field(default=3.5, metadata={"min": 0.0})
    max_content_distance: float = field(default=0.7, metadata={"min": 0.0})
    # Candidate search (data_pipeline/stages/near_candidates.py): k-means cells of about `cell_rows`
    # rows; a row's `neighbours` nearest are searched in the `probes` cells nearest its own.
    cell_rows: int = field(default=512, metadata={"min": 1})
    probes: int = field(default=12, metadata={"min": 1})


@dataclass
class Compact:
    """The columns dedup needs, one entry per eligible row."""
    uid: np.ndarray  # object (str)
    sha256: np.ndarray  # object (hex str)
    caption: np.ndarray  # uint64 digest of the caption: exact pairs compare captions
    pixels: np.ndarray  # int64
    file_bytes: np.ndarray  # int64
    codes: np.ndarray  # (n, 192) uint8 grid codes (near_candidates); (n, 0) where not needed

    @classmethod
    def concat(cls, pieces: list[Compact]) -> Compact:
        return cls(*(np.concatenate([getattr(p, f.name) for p in pieces]) for f in fields(cls)))

    def take(self, rows: np.ndarray) -> Compact:
        return Compact(*(getattr(self, f.name)[rows] for f in fields(self)))

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


def exact_dedup(candidates: Candidates, cfg: DedupConfig) -> Verdict:
    """The exact_dedup stage: the same image bytes (sha256) as a row kept before it."""
    if not cfg.exact:
        return Verdict.keep_all(len(candidates))
    reason, duplicate_of = exact_duplicates(candidate_table(candidates))
    return Verdict(reason, {"duplicate_of": duplicate_of})


def near_dedup(candidates: Candidates, cfg: DedupConfig) -> Verdict:
    """The near_dedup stage: re-encodes, resizes and crops of a row kept before it, confirmed on content."""
    if not cfg.near:
        return Verdict.keep_all(len(candidates))
    source = OnDisk(candidates.parts.dir, candidates.parts.ids, candidates.part, candidates.row)
    reason, duplicate_of = near_duplicates(candidate_table(candidates, codes=True), source, cfg,
                                           candidates.map_shared, candidates.chunks)
    return Verdict(reason, {"duplicate_of": duplicate_of})


def candidate_table(candidates: Candidates, codes: bool = False) -> Compact:
    """The candidates' compact columns, read part by part; their grid codes only when ``codes``."""
    pieces, start = [], 0
    for rows in candidates.columns(DEDUP_COLUMNS):
        where = slice(start, start + len(rows))
        rows.insert(0, "uid", candidates.uid[where])  # the candidates' own strings, not a second copy
        grid_code = (fingerprint_files.gather(Path(candidates.parts.dir), candidates.parts.ids, candidates.part[where],
                                              candidates.row[where], "code")
                     if codes else np.zeros((len(rows), 0), np.uint8))
        pieces.append(compact(rows, grid_code))
        start += len(rows)
    return Compact.concat(pieces)


def find_duplicates(rows: pd.DataFrame, cfg: DedupConfig, map_shared: Callable = serial_map,
                    chunks: int = 1) -> pd.DataFrame:
    """Both dedup stages over rows held in memory (tests, benchmarks): ``rows`` has uid, sha256, caption,
    width, height, file_bytes, thumbnail, signature. ``map_shared`` and ``chunks``: how the search and
    verification are spread.

    Returns uid, reason_dedup, duplicate_of for the rows found to be duplicates.
    """
    thumbnails = thumbnail_array(rows["thumbnail"])
    fingerprints = InMemory(Fingerprints(thumbnails, Signatures.parse(rows["signature"])))
    table = compact(rows, grid_codes(grid(thumbnails)))
    reason, duplicate_of = np.full(len(table), None, object), np.full(len(table), None, object)
    if cfg.exact:
        reason, duplicate_of = exact_duplicates(table)
    if cfg.near:
        left = np.flatnonzero(pd.isna(reason))
        reason[left], duplicate_of[left] = near_duplicates(table.take(left), InMemory(fingerprints.take(left)), cfg,
                                                           map_shared, chunks)
    found = pd.notna(reason)
    return pd.DataFrame({"uid": table.uid[found], "reason_dedup": reason[found],
                         "duplicate_of": duplicate_of[found]}).astype(object)


def exact_duplicates(table: Compact) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``table``: its reason (exact_duplicate_pair when the captions match too, else
    exact_duplicate_image; None when it is no copy) and the uid of the row it copies."""
    order = keep_order(table)
    group = pd.factorize(table.sha256[order])[0]
    head = np.unique(group, return_index=True)[1][group]  # each row's first position with its sha256
    copy = head != np.arange(len(order))
    caption = table.caption[order]
    same_caption = caption[copy] == caption[head[copy]]
    reason, duplicate_of = np.full(len(table), None, object), np.full(len(table), None, object)
    reason[order[copy]] = np.where(same_caption, "exact_duplicate_pair", "exact_duplicate_image")
    duplicate_of[order[copy]] = table.uid[order[head[copy]]]
    return reason, duplicate_of


def near_duplicates(table: Compact, source: FingerprintSource, cfg: DedupConfig, map_shared: Callable = serial_map,
                    chunks: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``table`` (its fingerprints in ``source``, same order): near_duplicate or None, and the
    uid of the row it duplicates."""
    order = keep_order(table)
    search = NearDuplicateSearch(cfg.neighbours, cfg.max_crop, cfg.coarse_residual, cfg.max_residual,
                                 cfg.max_content_distance)
    pairs = candidate_pairs(table.codes[order], cfg.neighbours, CellSearch(cfg.cell_rows, cfg.probes),
                            map_shared, chunks)
    same = verified(pairs, order, table.pixels, source, search, map_shared, chunks)
    match = near_duplicate_of(pairs[same], len(order))
    hit = match >= 0
    reason, duplicate_of = np.full(len(table), None, object), np.full(len(table), None, object)
    reason[order[hit]] = NEAR_DUPLICATE
    duplicate_of[order[hit]] = table.uid[order[match[hit]]]
    return reason, duplicate_of


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
