"""Deduplication: exact (sha256 of the image bytes) and perceptual near duplicates.

Per row (``signatures``, inside the workers): a 64-bit DCT perceptual hash of the luminance and the
mean colour of the four image quadrants, both from the 32×32 thumbnail the decode stage made.
Globally (``find_duplicates``, on the driver over these small columns): dedup needs every row, and
the hash columns are ~30 bytes a row, so one process holds millions of rows; pairs are found by
brute force over XOR-popcounts in chunks (exact, O(n²); fine to a few 10⁵ rows).

Only rows that passed decode and heuristics take part: a rejected row must not remove the
acceptable copy of itself. Keep-one rule, the same for both kinds: rows are ranked by pixel count
(larger first), then file bytes (larger first), then uid (smaller first); going down that ranking,
a row is a duplicate when it matches a row already kept, and ``duplicate_of`` names that row.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.fft import dctn

from data_pipeline.config import DedupConfig
from data_pipeline.stages.decode import THUMBNAIL_SIDE

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)
_CHUNK = 2048


def signature(thumbnail: bytes) -> tuple[int, bytes]:
    """(phash as a signed 64-bit int, 12 bytes of quadrant mean RGB)."""
    rgb = np.frombuffer(thumbnail, np.uint8).reshape(THUMBNAIL_SIDE, THUMBNAIL_SIDE, 3).astype(np.float64)
    coefficients = dctn(rgb @ _LUMA, norm="ortho")[:8, :8].ravel()
    # Bit 0 (the DC term) is always 0 so the hash is a pure function of the image structure.
    bits = coefficients > np.median(coefficients[1:])
    bits[0] = False
    phash = int(np.packbits(bits).view(">u8")[0].astype(np.int64))
    half = THUMBNAIL_SIDE // 2
    quadrants = rgb.reshape(2, half, 2, half, 3).mean(axis=(1, 3))
    return phash, np.rint(quadrants).astype(np.uint8).tobytes()


def signatures(batch: pd.DataFrame) -> pd.DataFrame:
    out = batch.copy()
    pairs = [signature(t) if t is not None else (None, None) for t in batch["thumbnail"]]
    out["phash"] = pd.array([p for p, _ in pairs], dtype="Int64")
    out["colour"] = [c for _, c in pairs]
    return out


def keep_order(rows: pd.DataFrame) -> np.ndarray:
    """Row positions in keep-one priority: most pixels, then most bytes, then smallest uid."""
    pixels = rows["width"].astype("int64").to_numpy() * rows["height"].astype("int64").to_numpy()
    return np.lexsort((rows["uid"].to_numpy(), -rows["file_bytes"].to_numpy(), -pixels))


def find_duplicates(rows: pd.DataFrame, cfg: DedupConfig) -> pd.DataFrame:
    """``rows``: eligible rows with uid, sha256, caption, width, height, file_bytes, phash, colour.

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
        matches = near_duplicate_of(
            rows["phash"].to_numpy(dtype=np.int64)[candidates],
            np.stack([np.frombuffer(c, np.uint8) for c in rows["colour"][candidates]]) if len(candidates)
            else np.zeros((0, 12), np.uint8),
            cfg.hamming, cfg.colour)
        for position, match in enumerate(matches):
            if match >= 0:
                found.append((rows["uid"][candidates[position]], "near_duplicate", rows["uid"][candidates[match]]))
    return pd.DataFrame(found, columns=["uid", "reason_dedup", "duplicate_of"])


def near_duplicate_of(phash: np.ndarray, colour: np.ndarray, hamming: int, colour_tol: float) -> np.ndarray:
    """For rows in keep order: index of the kept row each one duplicates, or -1 when it is kept."""
    n = len(phash)
    hashes = phash.view(np.uint64)
    colours = colour.astype(np.int16)
    neighbours: list[np.ndarray] = [np.empty(0, np.int64)] * n
    for start in range(0, n, _CHUNK):
        block = slice(start, min(start + _CHUNK, n))
        close = np.bitwise_count(hashes[block, None] ^ hashes[None, :]) <= hamming
        for offset, row in enumerate(close):
            i = start + offset
            earlier = np.flatnonzero(row[:i])  # only higher-priority rows can be kept before i
            if len(earlier):
                diff = np.abs(colours[earlier] - colours[i]).max(axis=1)
                neighbours[i] = earlier[diff <= colour_tol]
    duplicate_of = np.full(n, -1, dtype=np.int64)
    for i in range(n):
        kept = [j for j in neighbours[i] if duplicate_of[j] < 0]
        if kept:
            duplicate_of[i] = kept[0]
    return duplicate_of
