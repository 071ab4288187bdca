"""Perceptual near-duplicate search that survives re-encoding, resizing and small crops.

A global perceptual hash of a crop differs from its source as much as a natural look-alike does
(same subject, colour and layout, different picture), so matching is done by alignment instead:

1. candidates: every row's ``neighbours`` nearest rows by an 8×8 RGB thumbnail (``near_candidates``:
   searched within k-means cells, not against every row); a crop of ≤ 10 % a side is still among
   the nearest of its source.
2. coarse check: the smaller image of a candidate pair is compared with windows of the larger
   one (each side cut by 0, ½ or all of ``max_crop``: 81 windows, 8×8 grey cells, area-averaged
   from the 32×32 thumbnails). A crop lies inside its source, so searching the larger image
   alone suffices; a resize or a re-encode matches the whole window.
3. fine check, for pairs the coarse check keeps: the window is refined per axis in ½-pixel
   steps and compared in colour; the pair passes when the RMS difference of the best window is
   at most ``max_residual`` (0-255 levels).
4. content check, for pairs the fine check keeps: the content signatures (``content_signature``:
   the region inside letterbox bars, mean removed) cut to the same window must differ by at most
   ``max_content_distance`` (``content_distance``: 0 for equal contents, ≈1 for unrelated ones). Thumbnails of pictures with little low-frequency
   structure (noise, small objects on flat backgrounds) are nearly equal grey fields once
   averaged, and bars make them closer still; their detail is what differs.
A true copy shares its source's exact pixels, so once aligned it differs by compression noise
only, while a look-alike keeps its own background, noise and exact shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from data_pipeline.stages.content_signature import SIDE as SIGNATURE_SIDE, Signatures, content_distance, correlation

CELLS = 8  # comparison grid: cells per side
_COARSE_STEPS = 3  # margins per side in the coarse search: 0, max/2, max
_FINE_STEP = 0.5  # thumbnail pixels
_CHUNK = 1024
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class NearDuplicateSearch:
    neighbours: int = 10  # candidates per row
    max_crop: float = 0.1  # largest crop searched, as a fraction of the side, per side
    coarse_residual: float = 9.0  # grey RMS a candidate must reach in the coarse check
    max_residual: float = 3.5  # colour RMS of the aligned pair for a near duplicate
    max_content_distance: float = 0.7  # of the aligned content signatures, to confirm a pair


@dataclass(frozen=True)
class Fingerprints:
    """What the search compares, one row each: 32×32 RGB thumbnails (n, side, side, 3) uint8 and the
    parsed content signatures."""
    thumbnails: np.ndarray
    signatures: Signatures


def span_matrix(start: float, stop: float, side: int, cells: int = CELLS) -> np.ndarray:
    """(cells, side) weights that area-average pixels [start, stop) into ``cells`` equal cells."""
    edges = start + np.arange(cells + 1) * (stop - start) / cells
    pixels = np.arange(side)
    lo = np.maximum(edges[:-1, None], pixels[None, :])
    hi = np.minimum(edges[1:, None], pixels[None, :] + 1)
    weights = np.clip(hi - lo, 0.0, None)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _spans(margins: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """All (cut at start, cut at end) pairs of margins: their matrices (S, cells, side) and cuts (S, 2)."""
    cuts = np.array([(a, b) for a in margins for b in margins], dtype=np.float32)
    return np.stack([span_matrix(a, side - b, side) for a, b in cuts]), cuts


def grid(thumbnails: np.ndarray) -> np.ndarray:
    """(n, side, side, 3) uint8 → (n, CELLS·CELLS·3) float32: the whole image on the comparison grid."""
    whole = span_matrix(0, thumbnails.shape[1], thumbnails.shape[1])
    rows = np.einsum("ky,nyxc->nkxc", whole, thumbnails.astype(np.float32))
    return np.einsum("lx,nkxc->nklc", whole, rows).reshape(len(thumbnails), CELLS * CELLS * 3)


def coarse_residual(thumbnails: np.ndarray, larger: np.ndarray, smaller: np.ndarray,
                    max_crop: float) -> tuple[np.ndarray, np.ndarray]:
    """Grey RMS between each smaller image and the best of the larger image's coarse windows, and
    that window's cuts (top, bottom, left, right) in thumbnail pixels."""
    side = thumbnails.shape[1]
    spans, cuts = _spans(np.linspace(0, max_crop * side, _COARSE_STEPS), side)
    count = len(spans)
    flat = spans.reshape(-1, side)  # (S·cells, side)
    grey = thumbnails.astype(np.float32) @ _LUMA
    targets = grid_grey(grey[smaller])
    residual = np.empty(len(larger), np.float32)
    best = np.empty(len(larger), np.int64)
    order = np.argsort(larger, kind="stable")
    images, first = np.unique(larger[order], return_index=True)
    bounds = np.append(first, len(order))
    for start in range(0, len(images), _CHUNK):
        chunk = images[start:start + _CHUNK]
        windows = (flat @ grey[chunk] @ flat.T).reshape(-1, count, CELLS, count, CELLS)
        windows = windows.transpose(0, 1, 3, 2, 4).reshape(len(chunk), count * count, CELLS * CELLS)
        for offset in range(len(chunk)):
            rows = order[bounds[start + offset]:bounds[start + offset + 1]]
            # Summed squares of differences, not |w|² - 2·t·w + |t|²: a matrix product's rounding depends on how
            # many rows it multiplies (BLAS kernels), i.e. on which other pairs share this image in the task,
            # and the cancellation made that ~1e-3 RMS; a pair's verdict must not depend on its company.
            errors = ((windows[offset][None, :, :] - targets[rows][:, None, :]) ** 2).sum(axis=2)  # (k, windows)
            best[rows] = errors.argmin(axis=1)
            residual[rows] = errors[np.arange(len(rows)), best[rows]]
    residual = np.sqrt(np.maximum(residual, 0) / (CELLS * CELLS))
    y, x = np.divmod(best, count)
    return residual, np.concatenate([cuts[y], cuts[x]], axis=1)


def grid_grey(grey: np.ndarray) -> np.ndarray:
    whole = span_matrix(0, grey.shape[1], grey.shape[1])
    return (whole @ grey @ whole.T).reshape(len(grey), CELLS * CELLS)


def fine_residual(thumbnails: np.ndarray, larger: np.ndarray, smaller: np.ndarray, start_cuts: np.ndarray,
                  max_crop: float) -> tuple[np.ndarray, np.ndarray]:
    """Colour RMS after refining the coarse window per axis (x, then y) in ½-pixel steps, and the
    refined window's cuts (top, bottom, left, right)."""
    side = thumbnails.shape[1]
    margins = np.arange(0, max_crop * side + 1e-6, _FINE_STEP)
    spans, cuts = _spans(margins, side)
    flat = spans.reshape(-1, side)  # (S·cells, side)
    count = len(spans)

    def nearest(coarse: np.ndarray) -> np.ndarray:  # the fine span closest to a coarse one
        return np.abs(cuts[None, :, :] - coarse[:, None, :]).sum(axis=2).argmin(axis=1)

    out = np.empty(len(larger), np.float32)
    out_cuts = np.empty((len(larger), 4), np.float32)
    for start in range(0, len(larger), _CHUNK):
        part = slice(start, start + _CHUNK)
        image = thumbnails[larger[part]].astype(np.float32)  # (p, y, x, c)
        target = grid(thumbnails[smaller[part]]).reshape(-1, CELLS, CELLS, 3)
        y, x = nearest(start_cuts[part, :2]), nearest(start_cuts[part, 2:])
        for axis in ("x", "y"):
            if axis == "x":
                rows = np.matmul(spans[y], image.reshape(len(image), side, -1)).reshape(-1, CELLS, side, 3)
                windows = (rows.transpose(0, 1, 3, 2) @ flat.T).reshape(-1, CELLS, 3, count, CELLS)
                windows = windows.transpose(0, 3, 1, 4, 2)  # (p, S, ky, kx, c)
                x, best = _best_span(windows, target)
            else:
                columns = np.einsum("pjx,pyxc->pyjc", spans[x], image)  # (p, y, kx, c)
                windows = (flat @ columns.reshape(len(image), side, -1)).reshape(-1, count, CELLS, CELLS, 3)
                y, best = _best_span(windows, target)
        out[part] = np.sqrt(best / (CELLS * CELLS * 3))
        out_cuts[part] = np.concatenate([cuts[y], cuts[x]], axis=1)
    return out, out_cuts


def _best_span(windows: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    errors = ((windows - target[:, None]) ** 2).sum(axis=(2, 3, 4))
    best = errors.argmin(axis=1)
    return best, errors[np.arange(len(errors)), best]


def content_agrees(fingerprints: Fingerprints, larger: np.ndarray, smaller: np.ndarray, cuts: np.ndarray,
                   max_distance: float) -> np.ndarray:
    """Whether each aligned pair's contents differ by at most ``max_distance`` (``content_distance``):
    the larger image's signature is cut to the window the thumbnails aligned on (cuts in thumbnail
    pixels, applied to the content inside the bars) and resampled."""
    scale = SIGNATURE_SIDE / fingerprints.thumbnails.shape[1]
    out = np.empty(len(larger), bool)
    for n, (a, b) in enumerate(zip(larger, smaller)):
        levels_a, spread_a, levels_b, spread_b = fingerprints.signatures.compared_parts(a, b)
        top, bottom, left, right = cuts[n] * scale
        window = (span_matrix(top, SIGNATURE_SIDE - bottom, SIGNATURE_SIDE, SIGNATURE_SIDE) @ levels_a
                  @ span_matrix(left, SIGNATURE_SIDE - right, SIGNATURE_SIDE, SIGNATURE_SIDE).T)
        out[n] = content_distance(correlation(window, levels_b), spread_a, spread_b) <= max_distance
    return out


def verify(fingerprints: Fingerprints, larger: np.ndarray, smaller: np.ndarray,
           search: NearDuplicateSearch) -> np.ndarray:
    """Which candidate pairs are near duplicates: the coarse check, the fine one on its survivors,
    then the content check on the aligned pairs."""
    thumbnails = fingerprints.thumbnails
    residual, cuts = coarse_residual(thumbnails, larger, smaller, search.max_crop)
    same = residual <= search.coarse_residual
    fine, cuts = fine_residual(thumbnails, larger[same], smaller[same], cuts[same], search.max_crop)
    aligned = fine <= search.max_residual
    agrees = content_agrees(fingerprints, larger[same][aligned], smaller[same][aligned], cuts[aligned],
                            search.max_content_distance)
    aligned[aligned] = agrees
    same[same] = aligned
    return same


def serial_map(function: Callable, shared, items: list[tuple]) -> list:
    """``[function(shared, *item) for item in items]``; executors swap in a parallel version."""
    return [function(shared, *item) for item in items]
