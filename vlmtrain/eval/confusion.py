"""Confusion-matrix pictures for classification results."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
import numpy as np  # noqa: E402

# Above this many classes tick labels would overlap into a grey bar; the picture stays useful
# as a heat map of where the mass sits.
MAX_LABELLED_CLASSES = 100
MAX_ANNOTATED_CLASSES = 25


def write_confusion_png(confusion: Sequence[Sequence[int]], classnames: Sequence[str], title: str, path: Path) -> Path:
    """Row-normalised confusion matrix (row = true class: each row shows where that class went).

    Colour is the share of the row, so rare and common classes read alike; counts are written
    into the cells for small label sets.
    """
    counts = np.asarray(confusion, dtype=np.int64)
    num_classes = len(counts)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(4.0 + 0.16 * num_classes, 22.0)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if num_classes <= MAX_LABELLED_CLASSES:
        fontsize = 9 if num_classes <= 30 else 6 if num_classes <= 60 else 4.5
        ticks = np.arange(num_classes)
        ax.set_xticks(ticks, labels=classnames, rotation=90, fontsize=fontsize)
        ax.set_yticks(ticks, labels=classnames, fontsize=fontsize)
    if num_classes <= MAX_ANNOTATED_CLASSES:
        for row, col in zip(*np.nonzero(counts)):
            dark = shares[row, col] > 0.5
            ax.text(col, row, str(counts[row, col]), ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
