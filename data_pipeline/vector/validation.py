"""Input checks shared by the vector stages: bad input stops with a message naming the argument.

Errors are ``VectorInputError`` (a ``ValueError``) with the argument's name in ``.argument``; requests
the data cannot honour in full (k above the pool size, a seed with no neighbour) are clipped or
reported with a warning that names the argument, so a small pool never crashes a pipeline run.
"""
from __future__ import annotations

import warnings

import numpy as np

from vlmtrain.errors import UserError


class VectorInputError(UserError):
    """Unusable input to a vector stage; ``argument`` names the offending parameter."""

    def __init__(self, argument: str, reason: str):
        self.argument = argument
        super().__init__(f"{argument}: {reason}")


class ClippedWarning(UserWarning):
    """A size parameter (k, n_clusters, …) was larger than the data and was clipped to it."""


class NoNeighboursWarning(UserWarning):
    """Some queries (seed images, clusters) found nothing to contribute."""


def embedding_matrix(x: np.ndarray, argument: str, *, normalize: bool = True,
                     allow_empty: bool = False) -> np.ndarray:
    """A C-contiguous float32 (samples, dim) copy-or-view of ``x``, L2-normalized when asked.

    Rejects: not 2-D, no rows (unless ``allow_empty``), zero width, NaN/inf, and (when normalizing)
    all-zero rows, whose cosine is undefined. Messages name the argument and the first bad row.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise VectorInputError(argument, f"expected a 2-D (samples, dim) matrix, got shape {x.shape}")
    if x.shape[0] == 0 and not allow_empty:
        raise VectorInputError(argument, "is empty (0 rows); there is nothing to search")
    if x.shape[1] == 0:
        raise VectorInputError(argument, "has 0 columns; embeddings need at least one dimension")
    if not np.issubdtype(x.dtype, np.number):
        raise VectorInputError(argument, f"expected a numeric matrix, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        raise VectorInputError(argument, f"row {int(np.flatnonzero(~finite)[0])} has NaN or inf values")
    if normalize and len(x):
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if (norms == 0).any():
            raise VectorInputError(argument, f"row {int(np.flatnonzero(norms[:, 0] == 0)[0])} is all zeros; "
                                   "its cosine similarity is undefined")
        x = x / norms
    return x


def same_width(a: np.ndarray, a_name: str, b: np.ndarray, b_name: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise VectorInputError(b_name, f"has dimension {b.shape[1]} but {a_name} has {a.shape[1]}")


def per_sample(values: np.ndarray | None, n: int, argument: str) -> np.ndarray | None:
    """A float64 vector of one finite value per sample, or None."""
    if values is None:
        return None
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (n,):
        raise VectorInputError(argument, f"expected one value per sample, shape ({n},), got {values.shape}")
    if not np.isfinite(values).all():
        raise VectorInputError(argument, f"row {int(np.flatnonzero(~np.isfinite(values))[0])} is NaN or inf")
    return values


def positive_int(value: int, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise VectorInputError(argument, f"must be a positive integer, got {value!r}")
    return int(value)


def clipped(value: int, limit: int, argument: str, what: str) -> int:
    """``value`` if it is at most ``limit``, else ``limit`` with a ClippedWarning naming the argument."""
    value = positive_int(value, argument)
    if value > limit:
        warnings.warn(ClippedWarning(f"{argument}={value} is larger than {what} ({limit}); using {limit}"),
                      stacklevel=3)
        return limit
    return value


def unit_interval(value: float, argument: str, *, low: float = -1.0) -> float:
    if not (low <= value <= 1.0):
        raise VectorInputError(argument, f"must lie in [{low}, 1] (a cosine similarity), got {value!r}")
    return float(value)
