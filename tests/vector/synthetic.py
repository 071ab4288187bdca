"""Small synthetic embedding pools with known structure, and brute-force references."""
from __future__ import annotations

import numpy as np


def normalized(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, n_clusters: int, *, spread: float = 2.0, seed: int = 0):
    """Unit vectors around random unit centres; two members of a cluster have cosine ≈ 1/(1+spread²)."""
    rng = np.random.default_rng(seed)
    centres = normalized(rng.standard_normal((n_clusters, dim)))
    labels = rng.integers(0, n_clusters, n)
    x = centres[labels] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim)
    return normalized(x), labels


def with_copies(x: np.ndarray, n_groups: int, *, max_copies: int = 4, noise: float = 0.15, seed: int = 1):
    """Append 1–max_copies noisy copies (cosine ≈ 1/√(1+noise²)) of ``n_groups`` distinct rows.

    Returns the grown matrix and the planted groups (original row + its copies' rows).
    """
    rng = np.random.default_rng(seed)
    originals = rng.choice(len(x), n_groups, replace=False)
    rows, groups = [x], []
    next_row = len(x)
    for original in originals:
        count = int(rng.integers(1, max_copies + 1))
        copies = x[original] + noise * rng.standard_normal((count, x.shape[1])) / np.sqrt(x.shape[1])
        rows.append(normalized(copies))
        groups.append([int(original), *range(next_row, next_row + count)])
        next_row += count
    return np.concatenate(rows), groups


def brute_force_components(x: np.ndarray, k: int, threshold: float) -> np.ndarray:
    """Exact DINOv2 graph (j in i's top-k others or i in j's, cosine > threshold), union-find labels."""
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    parent = np.arange(len(x))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(x)):
        for j in np.argsort(-sims[i], kind="stable")[:k]:
            if sims[i, j] > threshold:
                parent[root(i)] = root(j)
    return np.array([root(i) for i in range(len(x))])


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two labelings group the rows identically."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def together_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    pairs = set()
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        pairs.update((int(a), int(b)) for i, a in enumerate(rows) for b in rows[i + 1:])
    return pairs
