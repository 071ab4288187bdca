"""Near-duplicate candidates without comparing every pair: each row's ``k`` nearest rows by its 8×8
colour grid, searched within cells.

A row's grid code is its 32×32 thumbnail area-averaged to 8×8×3 cells and rounded to uint8 (192
bytes). Squared L2 distances between codes are integers below 2²⁴·⁴ and float32 matrix products of
uint8 codes are exact (every partial sum stays below 2²⁴), so distances computed in any blocking
are equal, and ties are broken by row index: the k nearest of a row are one well-defined set.

Search: k-means splits the rows into cells of about ``cell_rows`` rows; the rows of a cell are
compared (one matrix product per block) with the rows of the ``probes`` cells whose centres are
nearest its centre, itself included. Cost per row: probes × cell_rows distances, whatever the
pool's size (the exhaustive search costs n per row). A near duplicate differs from its source by
compression noise and small shifts, so it lies in the same or a neighbouring cell;
``brute_force_neighbours`` is the exact reference, and with every cell probed (pools of at most
``probes`` cells) the search is that reference.

Candidates are the pairs (i < j) where j is among i's k nearest or i among j's.

Where the codes are: a ``CodeSource`` (the scored parts' fingerprint files, or an array in tests)
that the tasks read themselves, the rows they need at a time, so the driver never holds the pool's
codes (192 bytes a row). The plan task streams them in blocks; each join task reads the codes of
its cells and of the cells they probe, and may screen its pairs before returning them (the
near-duplicate verification), so only what survives travels back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

CODE_DIM = 8 * 8 * 3
_QUERY_BLOCK = 1024
_BASE_BLOCK = 4096
_KMEANS_ITERATIONS = 10
_KMEANS_POINTS_PER_CELL = 40
_ASSIGN_BLOCK = 65536  # rows whose codes the plan task reads at a time
JOIN_QUERIES = 16384  # rows one join task searches for, at most: bounds the codes it reads (≤ probes × this)


class CodeSource(Protocol):
    """The grid codes of rows 0..len-1, read a few at a time."""

    def __len__(self) -> int: ...

    def codes(self, rows: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class CodeArray:
    """Codes held in memory (tests, small pools)."""
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.values)

    def codes(self, rows: np.ndarray) -> np.ndarray:
        return self.values[rows]


@dataclass(frozen=True)
class CellSearch:
    cell_rows: int = 512  # average rows per k-means cell
    probes: int = 12  # cells each cell's rows are compared with (the nearest by centre, itself first)
    seed: int = 0


@dataclass(frozen=True)
class Cells:
    """members: row ids grouped by cell (cell c: members[starts[c]:starts[c + 1]]); probed: (cells,
    probes) the cells each cell's rows are compared with."""
    members: np.ndarray
    starts: np.ndarray
    probed: np.ndarray

    def rows(self, cell: int) -> np.ndarray:
        return self.members[self.starts[cell]:self.starts[cell + 1]]


def grid_codes(grids: np.ndarray) -> np.ndarray:
    """(n, 192) float grids (``near_duplicates.grid``) → (n, 192) uint8 codes."""
    return np.clip(np.rint(grids), 0, 255).astype(np.uint8)


def plan_cells(source: CodeSource, search: CellSearch) -> Cells:
    """k-means cells over the codes (a seeded sample trains them), each row in its nearest cell."""
    import faiss

    n = len(source)
    count = max(1, n // search.cell_rows)
    probes = min(search.probes, count)
    if count <= probes:  # every cell would be probed: one cell is the same search
        return Cells(np.arange(n), np.array([0, n]), np.zeros((1, 1), np.int64))
    rng = np.random.default_rng(search.seed)
    sample = np.sort(rng.choice(n, min(n, count * _KMEANS_POINTS_PER_CELL), replace=False))
    kmeans = faiss.Kmeans(CODE_DIM, count, niter=_KMEANS_ITERATIONS, seed=search.seed, verbose=False,
                          max_points_per_centroid=_KMEANS_POINTS_PER_CELL)
    kmeans.train(np.ascontiguousarray(source.codes(sample), dtype=np.float32))
    centres = faiss.IndexFlatL2(CODE_DIM)
    centres.add(kmeans.centroids)
    cell = np.empty(n, np.int64)
    for start in range(0, n, _ASSIGN_BLOCK):
        codes = np.ascontiguousarray(source.codes(np.arange(start, min(n, start + _ASSIGN_BLOCK))), dtype=np.float32)
        for at in range(0, len(codes), _BASE_BLOCK):
            cell[start + at:start + at + _BASE_BLOCK] = centres.search(codes[at:at + _BASE_BLOCK], 1)[1][:, 0]
    _, probed = centres.search(kmeans.centroids, probes)
    members = np.argsort(cell, kind="stable").astype(np.int32)  # 4 bytes a row in every join task's copy
    starts = np.searchsorted(cell[members], np.arange(count + 1))
    return Cells(members, starts, probed.astype(np.int64))


def _nearest(codes: np.ndarray, norms: np.ndarray, queries: np.ndarray, base: np.ndarray, k: int) -> np.ndarray:
    """(len(queries), k) ids among ``base`` (sorted ids) of each query's k nearest other rows, by
    (squared distance, id); -1 where fewer exist. ``norms``: every code's squared length."""
    n = len(codes)
    q = codes[queries].astype(np.float32)
    none = np.iinfo(np.int64).max
    best_key = np.full((len(queries), k), none, np.int64)
    for start in range(0, len(base), _BASE_BLOCK):
        ids = base[start:start + _BASE_BLOCK]
        dot = (q @ codes[ids].astype(np.float32).T).astype(np.int32)  # exact: see the module docstring
        distance = norms[queries][:, None] + norms[ids][None, :] - 2 * dot
        key = distance.astype(np.int64) * n + ids[None, :]
        key[queries[:, None] == ids[None, :]] = none  # not its own neighbour
        merged = np.concatenate([best_key, key], axis=1)
        best_key = np.take_along_axis(merged, np.argpartition(merged, k - 1, axis=1)[:, :k], axis=1)
    return np.where(best_key != none, best_key % n, -1)


def squared_norms(codes: np.ndarray) -> np.ndarray:
    return (codes.astype(np.int32) ** 2).sum(axis=1, dtype=np.int32)


def _pairs(queries: np.ndarray, nearest: np.ndarray) -> np.ndarray:
    pairs = np.stack([np.repeat(queries, nearest.shape[1]), nearest.ravel()], axis=1)
    pairs = pairs[pairs[:, 1] >= 0]
    return np.unique(np.sort(pairs, axis=1), axis=0)


def cell_neighbours(source: CodeSource, cells: Cells, cell_ids: np.ndarray, k: int) -> np.ndarray:
    """Candidate pairs (i < j) from the rows of the given cells and their k nearest in the probed cells.

    Reads the codes of those rows only (``needed``, sorted) and searches by position among them: the
    order of positions is the order of row ids, so ties break as they would by row id."""
    cell_ids = [cell for cell in cell_ids if len(cells.rows(cell))]
    needed = np.unique(np.concatenate([np.zeros(0, np.int64)] + [
        cells.rows(c) for cell in cell_ids for c in cells.probed[cell]]))
    codes = source.codes(needed)
    norms = squared_norms(codes)
    out = [np.zeros((0, 2), np.int64)]
    for cell in cell_ids:
        queries = np.searchsorted(needed, cells.rows(cell))
        base = np.searchsorted(needed, np.sort(np.concatenate([cells.rows(c) for c in cells.probed[cell]])))
        for start in range(0, len(queries), _QUERY_BLOCK):
            block = queries[start:start + _QUERY_BLOCK]
            out.append(_pairs(block, _nearest(codes, norms, block, base, k)))
    return needed[np.unique(np.concatenate(out), axis=0)]


def brute_force_neighbours(codes: np.ndarray, k: int) -> np.ndarray:
    """The exact reference: pairs (i < j) where one is among the other's k nearest of all rows."""
    everyone, norms = np.arange(len(codes)), squared_norms(codes)
    return np.unique(np.concatenate([np.zeros((0, 2), np.int64)] + [
        _pairs(everyone[s:s + _QUERY_BLOCK], _nearest(codes, norms, everyone[s:s + _QUERY_BLOCK], everyone, k))
        for s in range(0, len(codes), _QUERY_BLOCK)]), axis=0)


def _join(shared: tuple[CodeSource, Cells, Callable | None], cell_ids: np.ndarray, k: int) -> np.ndarray:
    source, cells, screen = shared
    pairs = cell_neighbours(source, cells, cell_ids, k)
    return pairs if screen is None else pairs[screen(pairs)]


def candidate_pairs(source: CodeSource, k: int, search: CellSearch, map_shared: Callable, chunks: int,
                    screen: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """(m, 2) unique pairs i < j: the cell search, planned in one task and joined in at least ``chunks``
    tasks of at most about ``JOIN_QUERIES`` rows, through ``map_shared`` (the executor's: Ray tasks, or a
    loop). ``screen``: which of a task's pairs it returns (a mask; run in the task), default all."""
    n = len(source)
    if n < 2:
        return np.zeros((0, 2), np.int64)
    (cells,) = map_shared(plan_cells, source, [(search,)])
    order = np.arange(len(cells.starts) - 1)
    tasks = min(len(order), max(chunks, -(-n // JOIN_QUERIES)))
    pieces = map_shared(_join, (source, cells, screen),
                        [(part, k) for part in np.array_split(order, tasks) if len(part)])
    return np.unique(np.concatenate([np.zeros((0, 2), np.int64), *pieces]), axis=0)
