"""Deduplication, two global stages: exact (sha256 of the image bytes), then perceptual near duplicates.

Both must compare every row with every other, yet the driver holds no string and no code per row
(a few integers a row: a 1M-row pool must not cost it gigabytes):
  exact   the first 64 bits of each sha256 (8 bytes a row); only rows whose prefix another row shares
          are read in full (uid, sha256, caption, sizes: ``Compact``), whole prefix groups at a time,
          about ``GROUP_ROWS`` rows, and compared (``exact_duplicates``).
  near    the keep-one ranking comes from pixel and byte counts, with uids read only for rows that
          tie on both, ``GROUP_ROWS`` at a time (``keep_order_of``); the grid codes, thumbnails and
          content signatures stay in the parts' fingerprint files (``FingerprintSource``): the
          candidate search tasks (``near_candidates``) read the codes they search and verify their
          pairs there (``near_duplicates``), reading the rows of ``VERIFY_PAIRS`` pairs at a time,
          so only verified pairs come back.
A stage's verdict names the row a duplicate copies by its candidate position (``References``).

Only rows that passed decode and heuristics take part (the stages' candidates), and near_dedup sees
only what exact_dedup kept: a rejected row must not remove the acceptable copy of itself. Keep-one
rule, the same for both kinds: rows are ranked by pixel count (larger first), then file bytes
(larger first), then uid (smaller first); going down that ranking, a row is a duplicate when it
matches a row already kept, and ``duplicate_of`` names that row.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from data_pipeline import fingerprints as fingerprint_files
from data_pipeline.candidates import Candidates, References, Verdict
from data_pipeline.stages.content_signature import Signatures
from data_pipeline.stages.decode import THUMBNAIL_SIDE
from data_pipeline.stages.near_candidates import CellSearch, candidate_pairs, grid_codes
from data_pipeline.stages.near_duplicates import Fingerprints, NearDuplicateSearch, grid, serial_map, verify

VERIFY_PAIRS = 4096  # candidate pairs verified at a time in a search task (≈ 2 × 17 kB a pair)
GROUP_ROWS = 1 << 16  # rows whose strings (uid, sha256) the driver reads at a time (≈ 10 MB of them)
EXACT_REASONS = ("exact_duplicate_image", "exact_duplicate_pair")
NEAR_DUPLICATE = "near_duplicate"
DEDUP_COLUMNS = ["sha256", "caption", "width", "height", "file_bytes"]  # with the uid
_SIZE_COLUMNS = ["width", "height", "file_bytes"]


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
    """The columns exact dedup compares, one entry per row."""
    uid: np.ndarray  # object (str)
    sha256: np.ndarray  # object (hex str)
    caption: np.ndarray  # uint64 digest of the caption: exact pairs compare captions
    pixels: np.ndarray  # int64
    file_bytes: np.ndarray  # int64

    def take(self, rows: np.ndarray) -> Compact:
        return Compact(*(getattr(self, f.name)[rows] for f in fields(self)))

    def __len__(self) -> int:
        return len(self.uid)


def caption_digest(captions) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b((c or "").encode(), digest_size=8).digest(), "little")
                     for c in captions], np.uint64)


def pixels_of(rows: pd.DataFrame) -> np.ndarray:
    return rows["width"].astype("int64").to_numpy() * rows["height"].astype("int64").to_numpy()


def compact(rows: pd.DataFrame) -> Compact:
    """``rows``: uid, sha256, caption, width, height, file_bytes."""
    return Compact(rows["uid"].to_numpy(object), rows["sha256"].to_numpy(object), caption_digest(rows["caption"]),
                   pixels_of(rows), rows["file_bytes"].to_numpy(np.int64))


@dataclass(frozen=True)
class InMemory:
    """Fingerprints and grid codes held in memory (tests, benchmarks, small pools)."""
    fingerprints: Fingerprints
    grid_codes: np.ndarray

    def __len__(self) -> int:
        return len(self.grid_codes)

    def take(self, rows: np.ndarray) -> Fingerprints:
        signatures = self.fingerprints.signatures
        return Fingerprints(self.fingerprints.thumbnails[rows], Signatures(*(
            getattr(signatures, f)[rows] for f in ("bars", "content", "content_spread", "whole", "whole_spread"))))

    def codes(self, rows: np.ndarray) -> np.ndarray:
        return self.grid_codes[rows]

    def subset(self, rows: np.ndarray) -> InMemory:
        return InMemory(self.take(rows), self.grid_codes[rows])


@dataclass(frozen=True)
class OnDisk:
    """Fingerprints and grid codes in the scored parts' fingerprint files: row r is record ``row[r]`` of part
    ``part[r]`` (an index into ``part_ids``)."""
    parts_dir: str
    part_ids: list[str]
    part: np.ndarray
    row: np.ndarray

    def __len__(self) -> int:
        return len(self.part)

    def take(self, rows: np.ndarray) -> Fingerprints:
        records = fingerprint_files.gather(Path(self.parts_dir), self.part_ids, self.part[rows], self.row[rows])
        signatures = fingerprint_files.signature_bytes(records["signature"], records["signature_len"])
        return Fingerprints(np.ascontiguousarray(records["thumbnail"]), Signatures.parse(signatures))

    def codes(self, rows: np.ndarray) -> np.ndarray:
        return fingerprint_files.gather(Path(self.parts_dir), self.part_ids, self.part[rows], self.row[rows], "code")


FingerprintSource = InMemory | OnDisk


def exact_dedup(candidates: Candidates, cfg: DedupConfig) -> Verdict:
    """The exact_dedup stage: the same image bytes (sha256) as a row kept before it."""
    if not cfg.exact:
        return Verdict.keep_all(len(candidates))
    prefix = np.empty(len(candidates), np.uint64)
    for at, rows in _pieces(candidates, ["sha256"]):
        prefix[at] = sha256_prefix(rows["sha256"])
    by_prefix = np.argsort(prefix, kind="stable")
    shared = _in_runs(prefix[by_prefix])  # rows whose prefix another row shares: the only possible copies
    members, keys = by_prefix[shared], prefix[by_prefix][shared]
    del prefix, by_prefix, shared
    reason = np.full(len(candidates), None, object)
    duplicate_of = np.full(len(candidates), -1, np.int64)
    for group in group_slices(keys, GROUP_ROWS):
        at = members[group]
        reason[at], head = exact_duplicates(compact(candidates.column_at(["uid", *DEDUP_COLUMNS], at)))
        duplicate_of[at] = np.where(head >= 0, at[np.maximum(head, 0)], -1)
    return Verdict(reason, {"duplicate_of": References(duplicate_of)})


def near_dedup(candidates: Candidates, cfg: DedupConfig) -> Verdict:
    """The near_dedup stage: re-encodes, resizes and crops of a row kept before it, confirmed on content."""
    if not cfg.near:
        return Verdict.keep_all(len(candidates))
    order, pixels = keep_order_of(candidates)
    match = near_duplicate_match(OnDisk(candidates.parts.dir, candidates.parts.ids, candidates.part[order],
                                        candidates.row[order]), pixels, cfg, candidates.map_shared, candidates.chunks)
    del pixels
    hit = match >= 0
    reason = np.full(len(candidates), None, object)
    reason[order[hit]] = NEAR_DUPLICATE
    duplicate_of = np.full(len(candidates), -1, np.int64)
    duplicate_of[order[hit]] = order[match[hit]]
    return Verdict(reason, {"duplicate_of": References(duplicate_of)})


def find_duplicates(rows: pd.DataFrame, cfg: DedupConfig, map_shared: Callable = serial_map,
                    chunks: int = 1) -> pd.DataFrame:
    """Both dedup stages over rows held in memory (tests, benchmarks): ``rows`` has uid, sha256, caption,
    width, height, file_bytes, thumbnail, signature. ``map_shared`` and ``chunks``: how the search and
    verification are spread.

    Returns uid, reason_dedup, duplicate_of for the rows found to be duplicates.
    """
    thumbnails = thumbnail_array(rows["thumbnail"])
    source = InMemory(Fingerprints(thumbnails, Signatures.parse(rows["signature"])), grid_codes(grid(thumbnails)))
    table = compact(rows)
    reason, duplicate_of = np.full(len(table), None, object), np.full(len(table), -1, np.int64)
    if cfg.exact:
        reason, duplicate_of = exact_duplicates(table)
    if cfg.near:
        left = np.flatnonzero(pd.isna(reason))
        order = left[keep_order(table.take(left))]
        match = near_duplicate_match(source.subset(order), table.pixels[order], cfg, map_shared, chunks)
        hit = match >= 0
        reason[order[hit]] = NEAR_DUPLICATE
        duplicate_of[order[hit]] = order[match[hit]]
    found = pd.notna(reason)
    return pd.DataFrame({"uid": table.uid[found], "reason_dedup": reason[found],
                         "duplicate_of": table.uid[duplicate_of[found]]}).astype(object)


def keep_order(table: Compact) -> np.ndarray:
    """Row positions in keep-one priority: most pixels, then most bytes, then smallest uid."""
    return np.lexsort((table.uid, -table.file_bytes, -table.pixels))


def keep_order_of(candidates: Candidates) -> tuple[np.ndarray, np.ndarray]:
    """``keep_order`` of the candidates, and their pixel counts in that order: the uids are read only of rows
    that tie on pixels and bytes, ``GROUP_ROWS`` at a time."""
    pixels, file_bytes = np.empty(len(candidates), np.int64), np.empty(len(candidates), np.int64)
    for at, rows in _pieces(candidates, _SIZE_COLUMNS):
        pixels[at], file_bytes[at] = pixels_of(rows), rows["file_bytes"].to_numpy(np.int64)
    # Descending by both counts; the order within a tie is settled by uid below, so reversing an ascending
    # sort serves (and needs no negated copies).
    order = np.lexsort((file_bytes, pixels))[::-1]
    pixels, file_bytes = pixels[order], file_bytes[order]
    size_rank = np.zeros(len(order), np.int32)  # equal for rows that tie on both counts, in ranking order
    np.cumsum((pixels[1:] != pixels[:-1]) | (file_bytes[1:] != file_bytes[:-1]), out=size_rank[1:])
    del file_bytes
    tied = np.flatnonzero(_in_runs(size_rank))
    for group in group_slices(size_rank[tied], GROUP_ROWS):
        at = tied[group]
        uids = candidates.column_at(["uid"], order[at])["uid"].to_numpy(object)
        order[at] = order[at][np.lexsort((uids, size_rank[at]))]  # a tie's rows have equal pixel counts
    return order, pixels


def _pieces(candidates: Candidates, names: list[str]) -> Iterator[tuple[slice, pd.DataFrame]]:
    """``candidates.columns(names)`` with each piece's place among the candidates."""
    start = 0
    for rows in candidates.columns(names):
        yield slice(start, start + len(rows)), rows
        start += len(rows)


def sha256_prefix(hexes: pd.Series) -> np.ndarray:
    """The first 64 bits of each hex sha256."""
    return np.array([int(h[:16], 16) for h in hexes], np.uint64)


def _in_runs(keys: np.ndarray) -> np.ndarray:
    """For sorted ``keys``: whether each entry equals a neighbour (is in a run of two or more)."""
    same = keys[1:] == keys[:-1]
    out = np.zeros(len(keys), bool)
    out[1:] |= same
    out[:-1] |= same
    return out


def group_slices(keys: np.ndarray, most: int) -> Iterator[slice]:
    """Slices of sorted ``keys`` of about ``most`` entries each (more where one run of equal keys is longer),
    never splitting a run."""
    boundaries = np.flatnonzero(keys[1:] != keys[:-1]) + 1
    start = 0
    while start < len(keys):
        at = np.searchsorted(boundaries, start + most)
        stop = int(boundaries[at]) if at < len(boundaries) else len(keys)
        yield slice(start, stop)
        start = stop


def exact_duplicates(table: Compact) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``table``: its reason (exact_duplicate_pair when the captions match too, else
    exact_duplicate_image; None when it is no copy) and the position of the row it copies (-1: none)."""
    order = keep_order(table)
    group = pd.factorize(table.sha256[order])[0]
    head = np.unique(group, return_index=True)[1][group]  # each row's first position with its sha256
    copy = head != np.arange(len(order))
    caption = table.caption[order]
    same_caption = caption[copy] == caption[head[copy]]
    reason, duplicate_of = np.full(len(table), None, object), np.full(len(table), -1, np.int64)
    reason[order[copy]] = np.where(same_caption, "exact_duplicate_pair", "exact_duplicate_image")
    duplicate_of[order[copy]] = order[head[copy]]
    return reason, duplicate_of


def near_duplicate_match(source: FingerprintSource, pixels: np.ndarray, cfg: DedupConfig,
                         map_shared: Callable = serial_map, chunks: int = 1) -> np.ndarray:
    """For rows in keep order (``source`` and ``pixels``: theirs, in that order): the position of the kept
    row each is a near duplicate of, or -1. The search tasks verify the candidate pairs they find."""
    search = NearDuplicateSearch(cfg.neighbours, cfg.max_crop, cfg.coarse_residual, cfg.max_residual,
                                 cfg.max_content_distance)
    same = candidate_pairs(source, cfg.neighbours, CellSearch(cfg.cell_rows, cfg.probes), map_shared, chunks,
                           Verification(source, pixels, search))
    return near_duplicate_of(same, len(pixels))


@dataclass(frozen=True)
class Verification:
    """Which candidate pairs (positions into ``source``; ``pixels``: each row's) are near duplicates, verified
    ``VERIFY_PAIRS`` at a time: the search tasks' screen (``near_candidates.candidate_pairs``)."""
    source: FingerprintSource
    pixels: np.ndarray
    search: NearDuplicateSearch

    def __call__(self, pairs: np.ndarray) -> np.ndarray:
        first_larger = self.pixels[pairs[:, 0]] >= self.pixels[pairs[:, 1]]
        larger = np.where(first_larger, pairs[:, 0], pairs[:, 1])
        smaller = np.where(first_larger, pairs[:, 1], pairs[:, 0])
        return np.concatenate([np.zeros(0, bool), *(self._piece(larger[at:at + VERIFY_PAIRS],
                                                                smaller[at:at + VERIFY_PAIRS])
                                                    for at in range(0, len(pairs), VERIFY_PAIRS))])

    def _piece(self, larger: np.ndarray, smaller: np.ndarray) -> np.ndarray:
        """Read the fingerprints of these pairs' rows only, then ``verify``."""
        needed, local = np.unique(np.concatenate([larger, smaller]), return_inverse=True)
        return verify(self.source.take(needed), local[:len(larger)], local[len(larger):], self.search)


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
