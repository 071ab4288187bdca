"""Content signatures: what a near-duplicate pair must share beyond its thumbnails.

Two distinct pictures with little low-frequency structure (noise, a flat background with a small
object, a gradient) look alike on a coarse grid, and letterbox bars (img2dataset's
``resize_mode=border``) make them look more alike still. A signature keeps what tells them apart:
the region inside the bars, as ``SIDE``×``SIDE`` grey levels averaged from the full-resolution image
(before any 8-bit rounding, so faint detail survives), with its mean removed; stored as its spread
and the levels normalized by it (1,030 bytes; 2,056 with the whole image's part, when there are bars). A copy's content correlates with its source's;
another picture's does not. Bars found in one image of a pair only are a flat border of its
picture, not a letterbox: such a pair is compared on the whole images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

SIDE = 32
# Grey levels of detail that re-encoding alone can create: differences in content weaker than this
# do not tell two pictures apart (see ``content_distance``).
NOISE_FLOOR = 2.0
_BAR_TOLERANCE = 12  # grey levels a bar pixel may stray from the bar colour (JPEG ringing)
_MAX_BAR_SKEW = 2  # pixels: a letterbox centres the picture, so its two bars differ by rounding only
_SCALE = 32  # int8 steps per standard deviation (±4σ fits)
BAR_MATCH = 0.04  # two images' bars are the same when each differs by this fraction of the side at most


def bar_widths(grey: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) letterbox bars: runs of uniform lines of one shared colour at
    both opposite edges, of nearly equal width, leaving content between them; else (0, 0)."""
    def run(lines: np.ndarray, colour: float) -> int:
        even = np.abs(lines - colour).max(axis=1) <= _BAR_TOLERANCE
        return len(even) if even.all() else int(np.argmin(even))

    def widths(image: np.ndarray) -> tuple[int, int]:
        colour = image[0].mean()
        if abs(colour - image[-1].mean()) > _BAR_TOLERANCE:
            return 0, 0
        first, last = run(image, colour), run(image[::-1], colour)
        if first == 0 or last == 0 or abs(first - last) > _MAX_BAR_SKEW or first + last >= len(image) - 1:
            return 0, 0
        return first, last

    return widths(grey), widths(grey.T)


def content_signature(rgb: Image.Image) -> bytes:
    """Layout: the bars (top, bottom, left, right) in 1/256ths of the side (4 × uint8), then the part
    for the content inside them, then, only when there are bars, the part for the whole image. A part:
    the spread of its SIDE×SIDE grey levels (float16), then the mean-removed levels in units of that
    spread (SIDE² × int8)."""
    grey = np.asarray(rgb.convert("L"), dtype=np.float32)
    (top, bottom), (left, right) = bar_widths(grey)
    height, width = grey.shape
    bars = np.array([top / height, bottom / height, left / width, right / width]) * 256
    out = np.clip(np.rint(bars), 0, 255).astype(np.uint8).tobytes()
    out += _part(grey[top:height - bottom, left:width - right])
    return out + _part(grey) if top or left else out


def _part(grey: np.ndarray) -> bytes:
    small = np.asarray(Image.fromarray(grey, "F").resize((SIDE, SIDE), Image.BOX), dtype=np.float32)
    spread = float(small.std())
    levels = (small - small.mean()) / spread if spread > 0 else np.zeros_like(small)
    return np.float16(spread).tobytes() + np.clip(np.rint(levels * _SCALE), -127, 127).astype(np.int8).tobytes()


@dataclass(frozen=True)
class Signatures:
    """Parsed signatures, one row each: bars (n, 4) as fractions of the side; the content part and the
    whole-image part (the same as the content part when there are no bars) as normalized levels
    (n, SIDE, SIDE) float32 and spreads (n,) float32."""
    bars: np.ndarray
    content: np.ndarray
    content_spread: np.ndarray
    whole: np.ndarray
    whole_spread: np.ndarray

    @classmethod
    def parse(cls, signatures) -> Signatures:
        """Parse a sequence of ``content_signature`` bytes. The signatures of one length (with bars or
        without) are read as one byte table: a loop over rows cost the dedup step ≈10 % of its CPU."""
        signatures = list(signatures)
        n, part = len(signatures), 2 + SIDE * SIDE
        bars = np.empty((n, 4), np.float32)
        levels = np.empty((2, n, SIDE, SIDE), np.float32)
        spreads = np.empty((2, n), np.float32)
        lengths = np.array([len(signature) for signature in signatures], np.int64)
        for length in np.unique(lengths):
            rows = np.flatnonzero(lengths == length)
            table = np.frombuffer(b"".join(signatures[i] for i in rows), np.uint8).reshape(len(rows), length)
            bars[rows] = table[:, :4] / 256
            for k, offset in enumerate((4, 4 + part if length > 4 + part else 4)):
                spreads[k, rows] = table[:, offset:offset + 2].copy().view(np.float16)[:, 0]
                levels[k, rows] = table[:, offset + 2:offset + part].view(np.int8).reshape(len(rows), SIDE, SIDE)
        return cls(bars, levels[0], spreads[0], levels[1], spreads[1])

    def compared_parts(self, a: int, b: int) -> tuple[np.ndarray, float, np.ndarray, float]:
        """The parts two rows are compared on: their contents when both have the same bars, else the
        whole images (bars found in one image only are a flat border of its picture, not a letterbox)."""
        bars_a, bars_b = self.bars[a], self.bars[b]
        if bars_a.any() and np.abs(bars_a - bars_b).max() <= BAR_MATCH:
            return self.content[a], float(self.content_spread[a]), self.content[b], float(self.content_spread[b])
        return self.whole[a], float(self.whole_spread[a]), self.whole[b], float(self.whole_spread[b])


def correlation(window: np.ndarray, target: np.ndarray) -> float:
    """Pearson correlation of two equally shaped arrays (0 when either is constant)."""
    a, b = window - window.mean(), target - target.mean()
    norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / norm) if norm > 0 else 0.0


def content_distance(rho: float, spread_a: float, spread_b: float) -> float:
    """RMS difference of two mean-removed contents with these spreads and correlation ``rho``, relative
    to the RMS difference two unrelated contents would have (plus the noise floor): ≈0 for a copy,
    ≈1 for another picture, small for two contents too faint to compare."""
    difference = spread_a ** 2 + spread_b ** 2 - 2 * spread_a * spread_b * rho
    return float(np.sqrt(max(difference, 0.0) / (spread_a ** 2 + spread_b ** 2 + NOISE_FLOOR ** 2)))
