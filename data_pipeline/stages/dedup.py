"""Deduplication: exact (sha256 of the image bytes) and perceptual near duplicates.

Both are global (every row must meet every other), so they run on the driver over small columns:
sha256 for exact duplicates, and for near duplicates the 32×32 thumbnail and the content signature
the decode stage made (3 kB + 1 kB a row; see ``near_duplicates`` for the search, which catches
re-encodes, resizes and crops).

Only rows that passed decode and heuristics take part: a rejected row must not remove the
acceptable copy of itself. Keep-one rule, the same for both kinds: rows are ranked by pixel count
(larger first), then file bytes (larger first), then uid (smaller first); going down that ranking,
a row is a duplicate when it matches a row already kept, and ``duplicate_of`` names that row.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from data_pipeline.config import DedupConfig
from data_pipeline.stages.decode import THUMBNAIL_SIDE
from data_pipeline.stages.content_signature import Signatures
from data_pipeline.stages.near_duplicates import Fingerprints, NearDuplicateSearch, matching_pairs, serial_map


def keep_order(rows: pd.DataFrame) -> np.ndarray:
    """Row positions in keep-one priority: most pixels, then most bytes, then smallest uid."""
    pixels = rows["width"].astype("int64").to_numpy() * rows["height"].astype("int64").to_numpy()
    return np.lexsort((rows["uid"].to_numpy(), -rows["file_bytes"].to_numpy(), -pixels))


def find_duplicates(rows: pd.DataFrame, cfg: DedupConfig, map_shared: Callable = serial_map,
                    chunks: int = 1) -> pd.DataFrame:
    """``rows``: eligible rows with uid, sha256, caption, width, height, file_bytes, thumbnail, signature.
    ``map_shared`` and ``chunks``: how the near-duplicate verification is spread (see ``matching_pairs``).

    Returns uid, reason_dedup, duplicate_of for the rows found to be duplicates.
    """
    rows = rows.iloc[keep_order(rows)].reset_index(drop=True)
    found: list[tuple[str, str, str]] = []
    survivors = np.ones(len(rows), dtype=bool)
    if cfg.exact:
        first = rows.groupby("sha256", sort=False).cumcount().to_numpy() > 0
        representative = rows.groupby("sha256", sort=False)["uid"].transform("first")
        rep_caption = rows.groupby("sha256", sort=False)["caption"].transform("first")
        for i in np.flatnonzero(first):
            kind = "exact_duplicate_pair" if rows["caption"][i] == rep_caption[i] else "exact_duplicate_image"
            found.append((rows["uid"][i], kind, representative[i]))
        survivors &= ~first
    if cfg.near:
        candidates = np.flatnonzero(survivors)
        subset = rows.iloc[candidates]
        pixels = subset["width"].astype("int64").to_numpy() * subset["height"].astype("int64").to_numpy()
        search = NearDuplicateSearch(cfg.neighbours, cfg.max_crop, cfg.coarse_residual, cfg.max_residual,
                                     cfg.max_content_distance)
        fingerprints = Fingerprints(thumbnail_array(subset["thumbnail"]), Signatures.parse(subset["signature"]))
        pairs = matching_pairs(fingerprints, pixels, search, map_shared, chunks)
        for position, match in enumerate(near_duplicate_of(pairs, len(candidates))):
            if match >= 0:
                found.append((rows["uid"][candidates[position]], "near_duplicate", rows["uid"][candidates[match]]))
    return pd.DataFrame(found, columns=["uid", "reason_dedup", "duplicate_of"])


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
