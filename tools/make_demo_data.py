#!/usr/bin/env python
"""Generate the small, deterministic image-text corpus used by the vlmtrain demo.

Everything is drawn procedurally (PIL + numpy) or taken from scikit-learn's bundled
``load_digits()`` set, so no network access is needed.  The same ``--seed`` always
produces byte-identical files.

Content
  * scenes: a circle, square, triangle or star in one of six colours, three sizes and
    five positions, on a plain, gradient or textured light/dark background, with
    varied English captions ("a small red circle on the left", ...);
  * digits: real 8x8 handwritten digits upscaled, colourised and shifted, with
    captions such as "a handwritten digit 7" or "the number seven written by hand".
    70% of the 1,797 source digits feed the train pool; the rest are held out for eval.

The train pool (55% scenes, 45% digits) carries known, flagged noise: mismatched
captions (20%), near-duplicates (10%) and junk (4%: tiny images, empty, garbage or
non-English captions, corrupt JPEG bytes).  The eval sets are clean, freshly drawn,
and laid out the way CLIP_benchmark's webdataset loader expects.

Layout written under --out (see ``--help`` for details)::

    train/shard-000000.tar ...   webdataset samples: jpg, txt, json
    train/index.parquet          one row per train sample, incl. its noise kind
    eval/shapes/  eval/digits/   classnames.txt, zeroshot_classification_templates.txt,
                                 test/nshards.txt, test/0.tar ... (jpg, cls, txt, json)
    eval/retrieval/              dataset_type.txt ("retrieval"), test/nshards.txt, test/0.tar ...:
                                 jpg + two captions per image ("\\n"-joined txt)
    manifest.json                seed, sizes, counts, noise counts, class lists
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import shutil
import string
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from sklearn.datasets import load_digits
from tqdm import tqdm
from webdataset import TarWriter

GENERATOR_VERSION = "1.1.0"  # 1.1: eval sets in CLIP_benchmark's exact wds layout (nshards.txt, 0.tar …)

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 80, 230),
    "yellow": (245, 215, 20),
    "purple": (150, 40, 190),
    "orange": (250, 135, 0),
}
# Diameter of the shape's bounding circle as a fraction of the image side.
# "small" stays above 30% so the shape is still legible once resized to 32 px.
SIZES = {"small": 0.36, "medium": 0.48, "large": 0.62}
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUND_STYLES = ("plain", "gradient", "texture")
TONES = ("light", "dark")

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TRAIN_FRACTION = 0.7
# Digits are the harder half of the demo task: with fewer, contrastive training on 2 CPU cores
# learns colours and shapes but leaves digit identity near chance in a few minutes.
DIGIT_FRACTION_OF_TRAIN = 0.45
RETRIEVAL_SIZE = 300
RETRIEVAL_DIGIT_EVERY = 4  # every 4th retrieval image is a digit, the rest are scenes

JPEG_QUALITY = 90
SUPERSAMPLE = 2  # scenes are drawn at 2x and downsampled for anti-aliasing
TINY_SIZE = 12

NOISE_FRACTIONS = {
    "mismatched_caption": 0.20,
    "near_duplicate": 0.10,
    "tiny_image": 0.008,
    "empty_caption": 0.008,
    "garbage_caption": 0.008,
    "non_english_caption": 0.008,
    "corrupt_image": 0.008,
}
NOISE_KINDS = ("clean", *NOISE_FRACTIONS)

SHAPE_CLASSNAMES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
SHAPE_TEMPLATES = (
    "a photo of a {c}.",
    "a drawing of a {c}.",
    "a {c} on a background.",
    "a picture with a {c}.",
    "an image of a {c}.",
    "there is a {c}.",
)
DIGIT_TEMPLATES = (
    "a handwritten digit {c}.",
    "the number {c}.",
    "a photo of the digit {c}.",
    "a scan of the number {c}.",
    "the digit {c} written by hand.",
)

# ----------------------------------------------------------------------------- content


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    background: str  # "<style>-<tone>", e.g. "gradient-dark"

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Digit:
    digit: int
    source_index: int  # row of sklearn's load_digits()
    background: str

    @property
    def label(self) -> str:
        return DIGIT_WORDS[self.digit]


Content = Scene | Digit


def _rng(seed: int, *path: str | int) -> np.random.Generator:
    """An independent generator for one (split, item, purpose) path under `seed`."""
    words = [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in path]
    return np.random.default_rng([seed, *words])


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _random_background(rng: np.random.Generator) -> str:
    return f"{_pick(rng, BACKGROUND_STYLES)}-{_pick(rng, TONES)}"


def draw_scene(rng: np.random.Generator, shape: str | None = None, colour: str | None = None) -> Scene:
    return Scene(
        shape=shape or _pick(rng, SHAPES),
        colour=colour or _pick(rng, list(COLOURS)),
        size=_pick(rng, list(SIZES)),
        position=_pick(rng, POSITIONS),
        background=_random_background(rng),
    )


def draw_digit(rng: np.random.Generator, pool: np.ndarray, targets: np.ndarray) -> Digit:
    index = int(_pick(rng, pool))
    return Digit(digit=int(targets[index]), source_index=index, background=_random_background(rng))


def split_digits(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train pool, held-out) split of the source digit indices."""
    order = _rng(seed, "digit-split").permutation(count)
    cut = round(DIGIT_TRAIN_FRACTION * count)
    return np.sort(order[:cut]), np.sort(order[cut:])


# ----------------------------------------------------------------------------- images


def _background(rng: np.random.Generator, px: int, background: str) -> np.ndarray:
    """A low-saturation float RGB background so every shape colour stands out."""
    style, tone = background.split("-")
    lo, hi = (175, 240) if tone == "light" else (15, 75)

    def shade() -> np.ndarray:
        return rng.uniform(lo, hi) + rng.uniform(-12, 12, size=3)

    if style == "plain":
        return np.broadcast_to(shade(), (px, px, 3)).astype(np.float32)
    if style == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        y, x = np.mgrid[0:px, 0:px] / max(px - 1, 1)
        t = x * np.cos(angle) + y * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return ((1 - t)[..., None] * shade() + t[..., None] * shade()).astype(np.float32)
    coarse = rng.normal(size=(int(rng.integers(3, 9)),) * 2).astype(np.float32)
    blobs = np.asarray(Image.fromarray(coarse, "F").resize((px, px), Image.BICUBIC))
    return (shade() + rng.uniform(8, 18) * blobs[..., None]).astype(np.float32)


def _add_pixel_noise(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
    noisy = image + rng.uniform(2.0, 6.0) * rng.standard_normal(image.shape, dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")


def _jittered(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in rgb)


def _place(position: str, diameter: float, rng: np.random.Generator) -> tuple[float, float]:
    """Centre (fractions of the side) that puts a shape of `diameter` at `position`."""
    margin = 0.04
    near, far = margin + diameter / 2, 1 - margin - diameter / 2
    free = float(np.clip(0.5 + rng.uniform(-0.08, 0.08), near, far))
    return {
        "left": (near, free),
        "right": (far, free),
        "top": (free, near),
        "bottom": (free, far),
        "center": (0.5 + rng.uniform(-0.03, 0.03), 0.5 + rng.uniform(-0.03, 0.03)),
    }[position]


def _polygon(shape: str, cx: float, cy: float, d: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a square/triangle/star whose extent is about `d`, rotated by `angle`."""
    if shape == "square":
        radii, angles = [0.85 * d / np.sqrt(2)] * 4, np.pi / 4 + np.arange(4) * np.pi / 2
    elif shape == "triangle":
        radii, angles = [0.6 * d] * 3, -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        cy += 0.15 * d  # centre the bounding box rather than the centroid
    else:  # star: alternate outer and (chunky, so it survives 32 px) inner points
        radii = [0.55 * d if k % 2 == 0 else 0.275 * d for k in range(10)]
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    return [(cx + r * np.cos(a + angle), cy + r * np.sin(a + angle)) for r, a in zip(radii, angles)]


def render_scene(scene: Scene, rng: np.random.Generator, px: int) -> Image.Image:
    big = px * SUPERSAMPLE
    # The background is made at 1x; nearest upsampling + box reduce() returns it unchanged.
    background = np.clip(_background(rng, px, scene.background), 0, 255).astype(np.uint8)
    canvas = Image.fromarray(background).resize((big, big), Image.NEAREST)
    colour = _jittered(COLOURS[scene.colour], rng)
    diameter = SIZES[scene.size] * rng.uniform(0.92, 1.08)
    fx, fy = _place(scene.position, diameter, rng)
    cx, cy, d = fx * big, fy * big, diameter * big
    draw = ImageDraw.Draw(canvas)
    if scene.shape == "circle":
        draw.ellipse([cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2], fill=colour)
    else:
        draw.polygon(_polygon(scene.shape, cx, cy, d, np.deg2rad(rng.uniform(-15, 15))), fill=colour)
    small = np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32)
    return _add_pixel_noise(small, rng)


def _ink(tone: str, rng: np.random.Generator) -> np.ndarray:
    """Ink that contrasts with the background tone (dark ink on light paper, or inverted)."""
    dark_inks = ((20, 20, 20), (20, 30, 120), (130, 20, 20), (20, 90, 30))
    light_inks = ((245, 245, 245), (250, 230, 120), (180, 220, 255))
    return np.array(_jittered(_pick(rng, dark_inks if tone == "light" else light_inks), rng), np.float32)


def render_digit(digit: Digit, pixels: np.ndarray, rng: np.random.Generator, px: int) -> Image.Image:
    """Upscale an 8x8 digit (values 0..16), ink it onto a background and shift it slightly."""
    background = _background(rng, px, digit.background)
    glyph_px = int(round(px * rng.uniform(0.72, 0.95)))
    glyph = Image.fromarray((pixels / 16.0).astype(np.float32), "F").resize((glyph_px, glyph_px), Image.BICUBIC)
    slack = px - glyph_px
    shift = int(round(0.08 * px))
    x0, y0 = (int(np.clip(slack // 2 + rng.integers(-shift, shift + 1), 0, slack)) for _ in range(2))
    alpha = np.zeros((px, px, 1), np.float32)
    alpha[y0 : y0 + glyph_px, x0 : x0 + glyph_px, 0] = np.clip(np.asarray(glyph), 0.0, 1.0)
    return _add_pixel_noise(background * (1 - alpha) + _ink(digit.background.split("-")[1], rng) * alpha, rng)


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- captions

_POSITION_PHRASES = {
    "left": ("on the left", "at the left side", "near the left edge", "on the left side of the image"),
    "right": ("on the right", "at the right side", "near the right edge", "on the right side of the picture"),
    "top": ("at the top", "near the top", "in the upper part of the picture", "at the top of the image"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part of the image", "at the bottom of the picture"),
    "center": ("in the center", "in the middle", "in the center of the picture", "in the middle of the image"),
}
_SIZE_WORDS = {"small": ("small", "little"), "medium": ("medium-sized", "medium"), "large": ("large", "big")}
_BACKGROUND_WORDS = {"plain": "plain", "gradient": "gradient", "texture": "textured"}
_SCENE_TEMPLATES = (
    "a {colour} {shape}",
    "a {size} {colour} {shape}",
    "a {colour} {shape} {pos}",
    "a {size} {colour} {shape} {pos}",
    "a drawing of a {size} {colour} {shape} {pos}",
    "there is a {colour} {shape} {pos}",
    "there is a {size} {colour} {shape}",
    "{pos} there is a {colour} {shape}",
    "a picture of a {colour} {shape} on a {bg} background",
    "a {size} {colour} {shape} on a {bg} background",
    "an image showing a {size} {colour} {shape}",
    "a simple {colour} {shape} shape {pos}",
    "the {shape} is {colour}",
    "a {shape} in {colour} {pos}",
    "{colour} {shape}",
    "a {size} {shape} in {colour}",
    "a {colour} {shape} drawn {pos}",
    "one {size} {colour} {shape} {pos}",
)
_DIGIT_TEMPLATES = (
    "a handwritten digit {n}",
    "the number {w} written by hand",
    "a scan of the digit {w}",
    "{n}",
    "a handwritten {w}",
    "the digit {n}",
    "a handwritten number {w} on a {bg} background",
    "a blurry scan of a handwritten {n}",
    "digit {w}",
    "a photo of the number {w}",
    "the number {n}, handwritten",
    "a pixelated handwritten digit {w}",
)


def _finish(text: str, rng: np.random.Generator) -> str:
    """Fix a/an, then vary capitalisation and the final full stop like real alt text."""
    text = re.sub(r"\b([aA]) (?=[aeiouAEIOU])", r"\1n ", text)
    if rng.random() < 0.35:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.3:
        text += "."
    return text


def _background_word(background: str, rng: np.random.Generator) -> str:
    style, tone = background.split("-")
    return tone if style == "plain" or rng.random() < 0.5 else _BACKGROUND_WORDS[style]


def scene_caption(scene: Scene, rng: np.random.Generator) -> str:
    text = _pick(rng, _SCENE_TEMPLATES).format(
        colour=scene.colour,
        shape=scene.shape,
        size=_pick(rng, _SIZE_WORDS[scene.size]),
        pos=_pick(rng, _POSITION_PHRASES[scene.position]),
        bg=_background_word(scene.background, rng),
    )
    return _finish(text, rng)


def digit_caption(digit: Digit, rng: np.random.Generator) -> str:
    text = _pick(rng, _DIGIT_TEMPLATES).format(
        n=digit.digit, w=DIGIT_WORDS[digit.digit], bg=digit.background.split("-")[1]
    )
    return text if text.isdigit() else _finish(text, rng)


def caption(content: Content, rng: np.random.Generator) -> str:
    return scene_caption(content, rng) if isinstance(content, Scene) else digit_caption(content, rng)


def distinct_captions(content: Content, rng: np.random.Generator, count: int) -> list[str]:
    captions: list[str] = []
    while len(captions) < count:
        text = caption(content, rng)
        if text not in captions:
            captions.append(text)
    return captions


# Per language: shape -> (noun, feminine?), colour -> (masculine, feminine), positions,
# digit words and caption templates.  German avoids adjective declension ("in Rot").
_FOREIGN = {
    "es": {
        "shapes": {
            "circle": ("círculo", 0), "square": ("cuadrado", 0),
            "triangle": ("triángulo", 0), "star": ("estrella", 1),
        },
        "colours": {
            "red": ("rojo", "roja"), "green": ("verde", "verde"), "blue": ("azul", "azul"),
            "yellow": ("amarillo", "amarilla"), "purple": ("morado", "morada"), "orange": ("naranja", "naranja"),
        },
        "articles": ("un", "una"),
        "positions": {
            "left": "a la izquierda", "right": "a la derecha", "top": "arriba", "bottom": "abajo",
            "center": "en el centro",
        },
        "scene": (
            "{art} {shape} {colour} {pos}",
            "hay {art} {shape} {colour} {pos}",
            "un dibujo de {art} {shape} {colour}",
        ),
        "digits": ("cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve"),
        "digit": ("un dígito {n} escrito a mano", "el número {w}"),
    },
    "fr": {
        "shapes": {
            "circle": ("cercle", 0), "square": ("carré", 0), "triangle": ("triangle", 0), "star": ("étoile", 1),
        },
        "colours": {
            "red": ("rouge", "rouge"), "green": ("vert", "verte"), "blue": ("bleu", "bleue"),
            "yellow": ("jaune", "jaune"), "purple": ("violet", "violette"), "orange": ("orange", "orange"),
        },
        "articles": ("un", "une"),
        "positions": {
            "left": "à gauche", "right": "à droite", "top": "en haut", "bottom": "en bas", "center": "au centre",
        },
        "scene": (
            "{art} {shape} {colour} {pos}",
            "il y a {art} {shape} {colour} {pos}",
            "un dessin d'{art} {shape} {colour}",
        ),
        "digits": ("zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf"),
        "digit": ("un chiffre {n} écrit à la main", "le nombre {w}"),
    },
    "de": {
        "shapes": {"circle": ("Kreis", 0), "square": ("Quadrat", 0), "triangle": ("Dreieck", 0), "star": ("Stern", 0)},
        "colours": {
            "red": ("Rot",) * 2, "green": ("Grün",) * 2, "blue": ("Blau",) * 2,
            "yellow": ("Gelb",) * 2, "purple": ("Lila",) * 2, "orange": ("Orange",) * 2,
        },
        "articles": ("ein", "eine"),
        "positions": {"left": "links", "right": "rechts", "top": "oben", "bottom": "unten", "center": "in der Mitte"},
        "scene": ("{art} {shape} in {colour} {pos}", "{pos} ist {art} {shape} in {colour}"),
        "digits": ("null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"),
        "digit": ("eine handgeschriebene Ziffer {n}", "die Zahl {w}"),
    },
}


def foreign_caption(content: Content, rng: np.random.Generator) -> str:
    """A Spanish, French or German caption that describes the image correctly."""
    lang = _FOREIGN[_pick(rng, sorted(_FOREIGN))]
    if isinstance(content, Digit):
        return _pick(rng, lang["digit"]).format(n=content.digit, w=lang["digits"][content.digit])
    noun, feminine = lang["shapes"][content.shape]
    return _pick(rng, lang["scene"]).format(
        art=lang["articles"][feminine],
        shape=noun,
        colour=lang["colours"][content.colour][feminine],
        pos=lang["positions"][content.position],
    )


def garbage_caption(rng: np.random.Generator) -> str:
    alphabet = string.ascii_letters + string.digits + string.punctuation + "    "
    return "".join(rng.choice(list(alphabet), size=int(rng.integers(8, 41)))).strip() or "#"


# ----------------------------------------------------------------------------- train plan


@dataclass(frozen=True)
class TrainSample:
    index: int
    content: Content
    noise: str
    caption: str
    duplicate_of: int | None = None  # index of the original, for near-duplicates
    dup_transform: str | None = None

    @property
    def key(self) -> str:
        return train_key(self.index)


def train_key(index: int) -> str:
    return f"train-{index:07d}"


def noise_counts(num_train: int) -> dict[str, int]:
    counts = {kind: round(fraction * num_train) for kind, fraction in NOISE_FRACTIONS.items()}
    return {"clean": num_train - sum(counts.values()), **counts}


def _train_contents(seed: int, num_train: int, pool: np.ndarray, targets: np.ndarray) -> list[Content]:
    is_digit = np.zeros(num_train, bool)
    is_digit[: round(DIGIT_FRACTION_OF_TRAIN * num_train)] = True
    is_digit = _rng(seed, "train-kinds").permutation(is_digit)
    return [
        draw_digit(_rng(seed, "train", i, "content"), pool, targets)
        if is_digit[i]
        else draw_scene(_rng(seed, "train", i, "content"))
        for i in range(num_train)
    ]


def _assign_noise(rng: np.random.Generator, num_train: int) -> list[str]:
    """Exactly `noise_counts()` samples of each kind, at random positions, one kind per sample."""
    order = rng.permutation(num_train)
    kinds = ["clean"] * num_train
    start = 0
    for kind, count in noise_counts(num_train).items():
        if kind == "clean":
            continue
        for i in order[start : start + count]:
            kinds[i] = kind
        start += count
    return kinds


class OtherLabels:
    """Draws a sample whose label differs from a given one, as ``_pick`` over those samples' indices would
    (the same draw from ``rng``), without listing them: O(log n) a draw, so a 1M-sample pool plans in
    seconds rather than hours."""

    def __init__(self, labels: np.ndarray):
        self.size = len(labels)
        # Per label, its positions minus their rank: how many other-label samples precede each of them.
        self.before = {label: positions - np.arange(len(positions))
                       for label, positions in ((l, np.flatnonzero(labels == l)) for l in np.unique(labels))}

    def pick(self, rng: np.random.Generator, label) -> int | None:
        before = self.before[label]
        count = self.size - len(before)
        if not count:
            return None
        k = int(rng.integers(count))  # the k-th other-label sample, in index order
        return k + int(np.searchsorted(before, k, side="right"))


def plan_train(seed: int, num_train: int, pool: np.ndarray, targets: np.ndarray) -> list[TrainSample]:
    contents = _train_contents(seed, num_train, pool, targets)
    base = [caption(c, _rng(seed, "train", i, "caption")) for i, c in enumerate(contents)]
    other_labels = OtherLabels(np.array([c.label for c in contents]))
    rng = _rng(seed, "train-noise")
    kinds = _assign_noise(rng, num_train)
    clean = [i for i, kind in enumerate(kinds) if kind == "clean"]
    samples = []
    for i, (content, kind) in enumerate(zip(contents, kinds)):
        text, original, transform = base[i], None, None
        if kind == "mismatched_caption":
            donor = other_labels.pick(rng, content.label)
            if donor is not None:
                text = base[donor]
            else:  # only possible in a degenerate, single-label pool
                kind = "clean"
        elif kind == "near_duplicate":
            original = int(_pick(rng, clean))
            content = contents[original]
            transform = _pick(rng, ("jpeg_quality", "resize", "crop"))
            # Keep the original's caption half the time, otherwise paraphrase it.
            text = base[original] if rng.random() < 0.5 else caption(content, rng)
        elif kind == "empty_caption":
            text = ""
        elif kind == "garbage_caption":
            text = garbage_caption(rng)
        elif kind == "non_english_caption":
            text = foreign_caption(content, rng)
        samples.append(TrainSample(i, content, kind, text, original, transform))
    return samples


# ----------------------------------------------------------------------------- writing


class ShardSink:
    """Writes webdataset samples into numbered tar shards of at most `per_shard` samples."""

    def __init__(self, directory: Path, name_format: str, per_shard: int):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.name_format, self.per_shard = directory, name_format, per_shard
        self.names: list[str] = []
        self._writer: TarWriter | None = None
        self._count = 0

    def write(self, sample: dict[str, str | bytes]) -> str:
        """Write one sample (bytes fields, str key) and return the shard's file name."""
        if self._writer is None or self._count == self.per_shard:
            self._open_next()
        self._writer.write(sample)
        self._count += 1
        return self.names[-1]

    def _open_next(self) -> None:
        self.close()
        self.names.append(self.name_format.format(len(self.names)))
        # mtime=0 and fixed owner keep the tar bytes reproducible.
        self._writer = TarWriter(str(self.directory / self.names[-1]), encoder=False, mtime=0)
        self._count = 0

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _json_bytes(payload: dict) -> bytes:
    return json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()


def _content_fields(content: Content) -> dict:
    """The index/metadata columns describing what the image shows."""
    scene = isinstance(content, Scene)
    return {
        "kind": "scene" if scene else "digit",
        "shape": content.shape if scene else None,
        "colour": content.colour if scene else None,
        "size": content.size if scene else None,
        "position": content.position if scene else None,
        "digit": None if scene else content.digit,
        "source_index": None if scene else content.source_index,
        "background": content.background,
    }


@dataclass
class Writer:
    """What every split writer shares: output root, image drawing, sharding and progress."""

    out: Path
    seed: int
    image_size: int
    digit_pixels: np.ndarray  # load_digits().images, values 0..16
    per_shard: int
    bar: tqdm

    def image(self, content: Content, split: str, index: int) -> Image.Image:
        """The clean image of item `index` of `split`; its own random stream makes it reproducible."""
        rng = _rng(self.seed, split, index, "render")
        if isinstance(content, Scene):
            return render_scene(content, rng, self.image_size)
        return render_digit(content, self.digit_pixels[content.source_index], rng, self.image_size)

    def sink(self, relative: str, name_format: str) -> ShardSink:
        return ShardSink(self.out / relative, name_format, self.per_shard)


def _near_duplicate(image: Image.Image, transform: str, rng: np.random.Generator) -> bytes:
    """Re-encode, resize or slightly crop a copy of an original image."""
    if transform == "jpeg_quality":
        return encode_jpeg(image, quality=int(rng.integers(50, 81)))
    px = image.width
    if transform == "resize":
        side = round(px * _pick(rng, (0.75, 0.875, 1.125, 1.25)))
        return encode_jpeg(image.resize((side, side), Image.BICUBIC))
    most = max(1, round(0.1 * px))
    left, top, right, bottom = (int(rng.integers(0, most + 1)) for _ in range(4))
    if left + top + right + bottom == 0:  # a near-duplicate must differ from its original
        left = most
    return encode_jpeg(image.crop((left, top, px - right, px - bottom)))


def _corrupt(image: Image.Image, rng: np.random.Generator) -> bytes:
    """Either a JPEG cut off mid-scan (like an interrupted download) or random bytes."""
    if rng.random() < 0.5:
        data = encode_jpeg(image)
        return data[: int(len(data) * rng.uniform(0.3, 0.7))]
    return rng.bytes(int(rng.integers(500, 3000)))


def train_image_bytes(sample: TrainSample, writer: Writer) -> bytes:
    """The image bytes as written, including the image-level noise."""
    source = sample.index if sample.duplicate_of is None else sample.duplicate_of
    image = writer.image(sample.content, "train", source)
    rng = _rng(writer.seed, "train", sample.index, "noise")
    if sample.noise == "near_duplicate":
        return _near_duplicate(image, sample.dup_transform, rng)
    if sample.noise == "tiny_image":
        return encode_jpeg(image.resize((TINY_SIZE, TINY_SIZE), Image.LANCZOS))
    if sample.noise == "corrupt_image":
        return _corrupt(image, rng)
    return encode_jpeg(image)


def _image_size(data: bytes) -> tuple[int | None, int | None]:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.width, image.height
    except Exception:  # any decode failure: truncated data, unknown format, ...
        return None, None


INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("caption", pa.string()),
        ("kind", pa.string()),
        ("shape", pa.string()),
        ("colour", pa.string()),
        ("size", pa.string()),
        ("position", pa.string()),
        ("digit", pa.int64()),
        ("noise", pa.string()),
        ("duplicate_of", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("sha256", pa.string()),
        ("source_index", pa.int64()),
        ("background", pa.string()),
    ]
)


def _train_row(sample: TrainSample, data: bytes) -> dict:
    width, height = _image_size(data)
    return {
        "key": sample.key,
        "caption": sample.caption,
        **_content_fields(sample.content),
        "noise": sample.noise,
        "duplicate_of": None if sample.duplicate_of is None else train_key(sample.duplicate_of),
        "width": width,
        "height": height,
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def write_train(writer: Writer, samples: list[TrainSample]) -> list[str]:
    """Write the train shards and index.parquet; return the shard paths relative to the output root."""
    sink = writer.sink("train", "shard-{:06d}.tar")
    rows = []
    for sample in samples:
        data = train_image_bytes(sample, writer)
        row = _train_row(sample, data)
        meta = _json_bytes({**row, "dup_transform": sample.dup_transform})
        shard = sink.write({"__key__": sample.key, "jpg": data, "txt": sample.caption.encode(), "json": meta})
        rows.append({**row, "shard": shard})
        writer.bar.update()
    sink.close()
    pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), writer.out / "train" / "index.parquet")
    return [f"train/{name}" for name in sink.names]


def _write_text_lines(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _eval_sample(writer: Writer, split: str, index: int, content: Content, text: str, extra: dict) -> dict:
    key = f"{split.removeprefix('eval-')}-{index:07d}"
    return {
        "__key__": key,
        "jpg": encode_jpeg(writer.image(content, split, index)),
        "txt": text.encode(),
        "json": _json_bytes({"key": key, **_content_fields(content), **extra}),
    }


def shape_eval_items(seed: int, per_class: int) -> list[tuple[int, Scene]]:
    """(class index, scene) pairs: `per_class` fresh scenes of every "<colour> <shape>" class."""
    rng = _rng(seed, "eval-shapes", "content")
    items = []
    for cls, classname in enumerate(SHAPE_CLASSNAMES):
        colour, shape = classname.split()
        items += [(cls, draw_scene(rng, shape=shape, colour=colour)) for _ in range(per_class)]
    return items


def digit_eval_items(seed: int, per_class: int, held_out: np.ndarray, targets: np.ndarray) -> list[tuple[int, Digit]]:
    """(class index, digit) pairs: up to `per_class` distinct held-out digits of every class."""
    rng = _rng(seed, "eval-digits", "content")
    items = []
    for cls in range(len(DIGIT_WORDS)):
        chosen = np.sort(rng.permutation(held_out[targets[held_out] == cls])[:per_class])
        items += [(cls, Digit(cls, int(index), _random_background(rng))) for index in chosen]
    return items


# CLIP_benchmark's wds loader reads test/nshards.txt and then exactly test/0.tar ... test/{n-1}.tar.
EVAL_SHARD_NAME = "{:d}.tar"


def write_classification(
    writer: Writer, name: str, items: Sequence[tuple[int, Content]], classnames: Sequence[str], templates: Sequence[str]
) -> int:
    """Write eval/<name>/ in CLIP_benchmark's webdataset layout; return the sample count."""
    root = f"eval/{name}"
    _write_text_lines(writer.out / root / "classnames.txt", classnames)
    _write_text_lines(writer.out / root / "zeroshot_classification_templates.txt", templates)
    sink = writer.sink(f"{root}/test", EVAL_SHARD_NAME)
    split = f"eval-{name}"
    for i, (cls, content) in enumerate(items):
        text = caption(content, _rng(writer.seed, split, i, "caption"))
        sample = _eval_sample(writer, split, i, content, text, {"cls": cls, "classname": classnames[cls]})
        sink.write({**sample, "cls": str(cls).encode()})
        writer.bar.update()
    sink.close()
    _write_text_lines(writer.out / root / "test" / "nshards.txt", [str(len(sink.names))])
    return len(items)


def write_retrieval(writer: Writer, held_out: np.ndarray, targets: np.ndarray) -> int:
    """Write eval/retrieval/: fresh clean scenes and held-out digits with two captions each."""
    sink = writer.sink("eval/retrieval/test", EVAL_SHARD_NAME)
    split = "eval-retrieval"
    for i in range(RETRIEVAL_SIZE):
        rng = _rng(writer.seed, split, i, "content")
        is_digit = i % RETRIEVAL_DIGIT_EVERY == RETRIEVAL_DIGIT_EVERY - 1
        content = draw_digit(rng, held_out, targets) if is_digit else draw_scene(rng)
        texts = distinct_captions(content, _rng(writer.seed, split, i, "caption"), 2)
        sink.write(_eval_sample(writer, split, i, content, "\n".join(texts), {}))
        writer.bar.update()
    sink.close()
    _write_text_lines(writer.out / "eval/retrieval/test/nshards.txt", [str(len(sink.names))])
    _write_text_lines(writer.out / "eval/retrieval/dataset_type.txt", ["retrieval"])
    return RETRIEVAL_SIZE


# ----------------------------------------------------------------------------- entry points

GENERATED_PATHS = ("train", "eval", "manifest.json")


def _prepare_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"output directory {out} exists and is not empty (use --force to overwrite)")
        # Only remove what this script writes, never unrelated files the user keeps there.
        for name in GENERATED_PATHS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def generate(
    out_dir: str | Path,
    seed: int,
    num_train: int = 12000,
    image_size: int = 64,
    samples_per_shard: int = 1000,
    eval_per_class: int = 20,
    force: bool = False,
    progress: bool = False,
) -> dict:
    """Write the whole corpus under `out_dir` and return the manifest (also saved as manifest.json)."""
    out = Path(out_dir)
    _prepare_out_dir(out, force)
    digits = load_digits()
    targets = digits.target.astype(np.int64)
    pool, held_out = split_digits(seed, len(targets))
    samples = plan_train(seed, num_train, pool, targets)
    shapes = shape_eval_items(seed, eval_per_class)
    digit_items = digit_eval_items(seed, eval_per_class, held_out, targets)
    total = num_train + len(shapes) + len(digit_items) + RETRIEVAL_SIZE
    with tqdm(total=total, desc="writing samples", unit="img", disable=not progress) as bar:
        writer = Writer(out, seed, image_size, digits.images, samples_per_shard, bar)
        shard_paths = write_train(writer, samples)
        counts = {
            "train": num_train,
            "eval/shapes": write_classification(writer, "shapes", shapes, SHAPE_CLASSNAMES, SHAPE_TEMPLATES),
            "eval/digits": write_classification(writer, "digits", digit_items, DIGIT_WORDS, DIGIT_TEMPLATES),
            "eval/retrieval": write_retrieval(writer, held_out, targets),
        }

    manifest = {
        "generator": "tools/make_demo_data.py",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "samples_per_shard": samples_per_shard,
        "eval_per_class": eval_per_class,
        "counts": counts,
        "train_kinds": {
            "scene": sum(isinstance(s.content, Scene) for s in samples),
            "digit": sum(isinstance(s.content, Digit) for s in samples),
        },
        "noise_counts": {kind: sum(s.noise == kind for s in samples) for kind in NOISE_KINDS},
        "noise_fractions_target": NOISE_FRACTIONS,
        "digit_split": {"train_pool": len(pool), "held_out": len(held_out)},
        "classes": {"shapes": SHAPE_CLASSNAMES, "digits": list(DIGIT_WORDS)},
        "paths": {
            "train_shards": shard_paths,
            "train_index": "train/index.parquet",
            "eval_shapes": "eval/shapes",
            "eval_digits": "eval/digits",
            "eval_retrieval": "eval/retrieval",
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _summary(out: Path, manifest: dict) -> str:
    counts = ", ".join(f"{split}={n}" for split, n in manifest["counts"].items())
    noise = ", ".join(f"{kind}={n}" for kind, n in manifest["noise_counts"].items())
    shards = manifest["paths"]["train_shards"]
    return "\n".join(
        [
            f"samples: {counts}",
            f"train noise: {noise}",
            f"train: {out / shards[0]} .. {out / shards[-1]} ({len(shards)} shards)",
            f"train index: {out / 'train/index.parquet'}",
            f"eval: {out / 'eval/shapes'}, {out / 'eval/digits'}, {out / 'eval/retrieval'}",
            f"manifest: {out / 'manifest.json'}",
        ]
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _image_side(text: str) -> int:
    value = int(text)
    if value < 32:
        raise argparse.ArgumentTypeError(f"must be at least 32 pixels, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="make_demo_data.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Generate a small, deterministic image-text corpus for the vlmtrain CLIP demo.\n"
            "No network is needed, and the same --seed gives byte-identical files."
        ),
        epilog="""\
what is generated:
  train/shard-NNNNNN.tar  webdataset samples (jpg, txt, json) - 55% synthetic scenes
                          (circle/square/triangle/star x red/green/blue/yellow/purple/
                          orange x small/medium/large x left/right/top/bottom/center on
                          varied backgrounds) and 25% real handwritten digits from
                          sklearn's load_digits(), with English captions.
  train/index.parquet     one row per train sample: key, shard, caption, attributes,
                          noise kind, duplicate_of, width, height, sha256 of the jpg bytes.
                          The train pool contains flagged noise: ~20% mismatched captions,
                          ~10% near-duplicates, ~4% junk (tiny images, empty / garbage /
                          non-English captions, corrupt JPEG bytes).
  eval/shapes/            zero-shot classification, 24 classes "<colour> <shape>"
  eval/digits/            zero-shot classification on held-out digits ("zero".."nine")
                          (CLIP_benchmark layout: classnames.txt,
                          zeroshot_classification_templates.txt, test/nshards.txt,
                          test/0.tar ... test/N-1.tar with cls)
  eval/retrieval/         300 clean images with two captions each ("\\n"-joined txt),
                          dataset_type.txt, test/nshards.txt, test/0.tar ...
  manifest.json           seed, image size, counts, noise counts, class lists

Eval sets are clean, freshly drawn and independent of --num-train.
""",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="output directory (must be empty or absent unless --force)"
    )
    parser.add_argument("--seed", required=True, type=_non_negative_int, help="random seed (>= 0)")
    parser.add_argument("--num-train", type=_positive_int, default=12000, help="train pool size (default: 12000)")
    parser.add_argument("--image-size", type=_image_side, default=64, help="image side in pixels, >= 32 (default: 64)")
    parser.add_argument(
        "--samples-per-shard", type=_positive_int, default=1000, help="samples per tar shard (default: 1000)"
    )
    parser.add_argument(
        "--eval-per-class",
        type=_positive_int,
        default=20,
        help="images per class in the shapes and digits eval sets; digits are capped by the held-out count "
        "(default: 20)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --out, replacing its train/, eval/ and manifest.json (other files are kept)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = generate(
            args.out,
            seed=args.seed,
            num_train=args.num_train,
            image_size=args.image_size,
            samples_per_shard=args.samples_per_shard,
            eval_per_class=args.eval_per_class,
            force=args.force,
            progress=True,
        )
    except FileExistsError as error:
        print(f"make_demo_data.py: error: {error}", file=sys.stderr)
        return 2
    print(_summary(args.out, manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
