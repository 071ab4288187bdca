"""Zero-shot evaluation sets: find them, read their samples, decode them into batches.

Three layouts are read:

- **webdataset** (CLIP_benchmark's layout)::

      DIR/test/nshards.txt + DIR/test/0.tar … {n-1}.tar (or, the older layout, any DIR/test/*.tar):
                           samples with jpg (or jpeg/png/webp) and cls (class index as ASCII text)
                           for classification, or txt (captions, one per line) for retrieval
      DIR/classnames.txt   + zeroshot_classification_templates.txt (or .json): a classification set
      DIR/dataset_type.txt "retrieval" marks a retrieval set (without it: classification when the
                           set has class names)

- **image folder** (ImageNet style): ``DIR/<class folder>/**/*.jpg``. Classes are the sorted folder
  names (torchvision's ``ImageFolder`` order, which is also the order of the built-in
  ``imagenet`` class names for ILSVRC wnid folders). Class names default to the folder names.
- **CSV** (``.csv``, or ``.tsv`` tab-separated) with a header: an image column (``filepath``,
  ``image`` or ``path``; relative paths are relative to the file) and either ``label`` (class
  index or class name: classification) or a caption column (``caption``, ``title`` or ``text``:
  retrieval; several rows with the same image give that image several captions).

Undecodable images are skipped and recorded in a ``DecodeReport`` instead of aborting the run:
one bad JPEG in 50k must not cost a whole evaluation, but it must be visible, because it
changes the denominator. Under torch.distributed every rank decodes only its share of the
samples (every world-th one); each batch carries the samples' positions so that results can
be put back into storage order.
"""
from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
import webdataset
from PIL import Image

from vlmtrain.distributed.collectives import all_gather_objects, rank_and_size
from vlmtrain.errors import EvalDataError
from vlmtrain.eval.metadata import CLASSNAMES_STEM, Template, find_metadata_file, resolve_classnames_and_templates

__all__ = ["EvalDataError", "EvalSet", "DecodeReport", "discover_eval_sets", "open_eval_set", "eval_batches"]

logger = logging.getLogger(__name__)

SPLIT_DIR = "test"
NSHARDS_FILE = "nshards.txt"  # CLIP_benchmark: the split's shard count; shards are 0.tar … {n-1}.tar
DATASET_TYPE_FILE = "dataset_type.txt"  # CLIP_benchmark: "retrieval" (else classification)
CLASSIFICATION = "zeroshot_classification"
RETRIEVAL = "zeroshot_retrieval"
KINDS = ("webdataset", "imagefolder", "csv")
# The extensions CLIP_benchmark's wds loader accepts, in its order of preference.
WDS_IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CSV_IMAGE_COLUMNS = ("filepath", "image", "path")
CSV_CAPTION_COLUMNS = ("caption", "title", "text")
CSV_LABEL_COLUMN = "label"
# What PIL raises for bytes that are not a readable image: unidentified/truncated files
# (OSError), broken headers (SyntaxError, ValueError, EOFError), decompression bombs.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

# PIL names the in-memory file by its repr ("<_io.BytesIO object at 0x7f…>"): noise that
# would make reports differ between runs and ranks.
_MEMORY_ADDRESS = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>")

Transform = Callable[[Image.Image], torch.Tensor]
Label = int | list[str]


class Skipped(NamedTuple):
    """An image left out of the evaluation: its key, why, and its position in storage order."""

    key: str
    reason: str
    position: int


@dataclass
class DecodeReport:
    """Images skipped because they could not be decoded.

    Pass one to ``eval_batches``; it is filled while iterating, so read it afterwards.
    """

    skipped: list[Skipped] = field(default_factory=list)

    def summary(self, limit: int = 10) -> str:
        """One line for logs, e.g. ``skipped 2 undecodable images: a (OSError: ...), b (...)``."""
        shown = ", ".join(f"{s.key} ({s.reason})" for s in self.skipped[:limit])
        more = f", ... and {len(self.skipped) - limit} more" if len(self.skipped) > limit else ""
        return f"skipped {len(self.skipped)} undecodable images: {shown}{more}"

    def gathered(self) -> DecodeReport:
        """Collective: the skips of all ranks, in storage order (this report itself on one rank)."""
        merged = [s for part in all_gather_objects(self.skipped) for s in part]
        return DecodeReport(sorted(merged, key=lambda s: s.position))


@dataclass(frozen=True)
class RawSample:
    """One stored sample, read lazily: only the rank that owns it pays for image and label."""

    key: str
    where: str  # for messages: "sample 'k' in /x/0.tar", a file path, "/x.csv row 3"
    read_image: Callable[[], bytes]
    read_label: Callable[[], Label]


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set; ``classnames``/``templates`` are set for classification sets."""

    name: str
    path: Path
    kind: str
    task: str
    classnames: list[str] | None = None
    templates: list[Template] | None = None

    def samples(self) -> Iterator[RawSample]:
        """Every sample in storage order (the order CLIP_benchmark reads them in)."""
        if self.kind == "webdataset":
            return _webdataset_samples(self)
        if self.kind == "imagefolder":
            return _imagefolder_samples(self)
        return _csv_samples(self)


# ---------------------------------------------------------------- finding and opening sets


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _class_folders(path: Path) -> list[Path]:
    """Subdirectories (sorted by name) when any of them directly holds an image, else ``[]``.

    A directory holding a webdataset set or a CSV file holds sets; it is not an image folder.
    """
    folders = sorted((p for p in path.iterdir() if p.is_dir()), key=lambda p: p.name)
    if any((folder / SPLIT_DIR).is_dir() for folder in folders) or any(_is_csv(p) for p in path.iterdir()):
        return []
    if any(_is_image_file(f) for folder in folders for f in folder.iterdir()):
        return folders
    return []


def _is_csv(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in (".csv", ".tsv")


def detect_kind(path: Path) -> str | None:
    """The layout at ``path``, or None when it is not an eval set itself."""
    if _is_csv(path):
        return "csv"
    if not path.is_dir():
        return None
    if (path / SPLIT_DIR).is_dir():
        return "webdataset"
    if _class_folders(path):
        return "imagefolder"
    return None


def discover_eval_sets(root: str | Path, **options: Any) -> list[EvalSet]:
    """``root`` itself when it is an eval set, else the eval sets directly inside it (sorted).

    ``options`` (``classnames``, ``templates``, ``task``) apply to every set found.
    """
    root = Path(root)
    if not root.exists():
        raise EvalDataError(f"eval data path does not exist: {root}")
    if detect_kind(root):
        return [open_eval_set(root, **options)]
    if root.is_dir():
        found = sorted((p for p in root.iterdir() if detect_kind(p)), key=lambda p: p.name)
        if found:
            return [open_eval_set(p, **options) for p in found]
    raise EvalDataError(
        f"no eval sets in {root}: expected a webdataset set (test/*.tar), an image folder "
        f"(<class>/<image> files) or a .csv/.tsv file, there or directly inside it"
    )


def open_eval_set(
    path: str | Path,
    *,
    name: str | None = None,
    kind: str | None = None,
    task: str | None = None,
    classnames: str | Path | None = None,
    templates: str | Path | None = None,
) -> EvalSet:
    """Describe the set at ``path``; class names and templates are read now, so errors come early.

    ``task`` (``zeroshot_classification``/``zeroshot_retrieval``) is inferred when not given: an
    image folder or a CSV with a ``label`` column is classification, a webdataset set is
    classification when it has class names (its own file or ``classnames``).
    """
    path = Path(path)
    if not path.exists():
        raise EvalDataError(f"eval set path does not exist: {path}")
    kind = kind or detect_kind(path)
    if kind not in KINDS:
        raise EvalDataError(
            f"{path} is not an eval set: expected test/*.tar (webdataset), <class>/<image> folders "
            f"(image folder) or a .csv/.tsv file" + (f"; got kind {kind!r}, allowed: {', '.join(KINDS)}" if kind else "")
        )
    name = name or (path.stem if kind == "csv" else path.name)
    directory = path.parent if kind == "csv" else path
    if kind == "webdataset":
        shard_paths(path)  # no shards: say so now, not at the first batch
    task = task or _infer_task(path, kind, directory, classnames)
    if task == RETRIEVAL:
        return EvalSet(name, path, kind, task)
    if task != CLASSIFICATION:
        raise EvalDataError(f"unknown task {task!r} for {path}: use {CLASSIFICATION} or {RETRIEVAL}")
    default_names = None
    if kind == "imagefolder":  # ImageNet-style folders are often named by class already
        default_names = [folder.name.replace("_", " ") for folder in _class_folders(path)]
    names, loaded_templates = resolve_classnames_and_templates(directory, name, classnames, templates, default_names)
    if kind == "imagefolder" and len(names) != len(default_names):
        raise EvalDataError(f"{path} has {len(default_names)} class folders but {len(names)} class names were given")
    return EvalSet(name, path, kind, task, names, loaded_templates)


def _infer_task(path: Path, kind: str, directory: Path, classnames: str | Path | None) -> str:
    if kind == "imagefolder":
        return CLASSIFICATION
    if kind == "csv":
        return CLASSIFICATION if CSV_LABEL_COLUMN in _csv_table(path)[0] else RETRIEVAL
    if (directory / DATASET_TYPE_FILE).is_file():
        declared = (directory / DATASET_TYPE_FILE).read_text().strip().lower()
        return RETRIEVAL if declared == "retrieval" else CLASSIFICATION
    has_classnames = classnames is not None or find_metadata_file(directory, CLASSNAMES_STEM) is not None
    return CLASSIFICATION if has_classnames else RETRIEVAL


# ---------------------------------------------------------------- webdataset


def _natural_key(path: Path) -> list[Any]:
    """Sort key putting 2.tar before 10.tar, so shards are read in CLIP_benchmark's 0..n-1 order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def shard_paths(dataset_dir: Path) -> list[str]:
    """The test split's tar shards in a deterministic order; error if there are none. With
    ``test/nshards.txt`` (CLIP_benchmark's layout) exactly ``0.tar … {n-1}.tar``, as CLIP_benchmark reads
    them; without it (our older layout, e.g. ``000000.tar``) every tar, in natural order."""
    split_dir = dataset_dir / SPLIT_DIR
    count_file = split_dir / NSHARDS_FILE
    if count_file.is_file():
        return _counted_shards(split_dir, count_file)
    shards = sorted(split_dir.glob("*.tar"), key=_natural_key)
    if not shards:
        raise EvalDataError(
            f"no shards found: expected {split_dir}/*.tar (CLIP_benchmark webdataset layout); "
            "point the evaluation at the directory that contains test/, or write the shards first"
        )
    return [str(path) for path in shards]


def _counted_shards(split_dir: Path, count_file: Path) -> list[str]:
    text = count_file.read_text().strip()
    if not text.isdigit() or int(text) == 0:
        raise EvalDataError(f"{count_file} must hold the number of shards (a positive integer), got {text!r}")
    shards = [split_dir / f"{i}.tar" for i in range(int(text))]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise EvalDataError(f"{count_file} says {text} shards (0.tar … {int(text) - 1}.tar) but "
                            f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''} is missing")
    return [str(path) for path in shards]


def _wds_where(sample: dict[str, Any]) -> str:
    return f"sample {sample['__key__']!r} in {sample.get('__url__', '?')}"


def _wds_image(sample: dict[str, Any]) -> bytes:
    """The sample's encoded image, whichever supported extension it uses."""
    for extension in WDS_IMAGE_EXTENSIONS:
        if extension in sample:
            return sample[extension]
    fields = sorted(name for name in sample if not name.startswith("__"))
    raise EvalDataError(
        f"{_wds_where(sample)} has no image: expected a member named <key>.jpg "
        f"(or .{', .'.join(WDS_IMAGE_EXTENSIONS)}), found {fields}"
    )


def _wds_class_index(sample: dict[str, Any]) -> int:
    """The ``cls`` field: the class index as ASCII text."""
    if "cls" not in sample:
        raise EvalDataError(f"{_wds_where(sample)} has no .cls member: classification samples need their class index")
    raw = sample["cls"]
    try:
        return int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise EvalDataError(
            f"{_wds_where(sample)}: .cls must be an integer class index as ASCII text, got {raw!r}"
        ) from None


def _wds_captions(sample: dict[str, Any]) -> list[str]:
    """The ``txt`` field split into one caption per line (CLIP_benchmark: ``str.splitlines``)."""
    if "txt" not in sample:
        raise EvalDataError(f"{_wds_where(sample)} has no .txt member: retrieval samples need their captions")
    captions = [line.strip() for line in sample["txt"].decode("utf-8").splitlines() if line.strip()]
    if not captions:
        raise EvalDataError(f"{_wds_where(sample)} has an empty .txt: every retrieval image needs a caption")
    return captions


def _webdataset_samples(eval_set: EvalSet) -> Iterator[RawSample]:
    """Every process reads every shard: no node/worker splitting, which webdataset would
    otherwise refuse (or silently apply) under torch.distributed; ranks pick their share later."""
    dataset = webdataset.WebDataset(
        shard_paths(eval_set.path), shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
    )
    label = _wds_class_index if eval_set.task == CLASSIFICATION else _wds_captions
    for sample in dataset:
        yield RawSample(sample["__key__"], _wds_where(sample), partial(_wds_image, sample), partial(label, sample))


# ---------------------------------------------------------------- image folder


def _imagefolder_samples(eval_set: EvalSet) -> Iterator[RawSample]:
    """Images under each class folder, in sorted path order (as torchvision's ImageFolder)."""
    for index, folder in enumerate(_class_folders(eval_set.path)):
        for image in sorted(p for p in folder.rglob("*") if _is_image_file(p)):
            key = image.relative_to(eval_set.path).as_posix()
            yield RawSample(key, str(image), partial(_read_file, image, str(image)), partial(int, index))


def _read_file(path: Path, where: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise EvalDataError(f"{where}: cannot read image file {path}: {err.strerror or err}") from None


# ---------------------------------------------------------------- CSV


def _csv_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a .csv (comma) or .tsv (tab) file."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")), delimiter=delimiter)
    rows = list(reader)
    if not reader.fieldnames:
        raise EvalDataError(f"{path} is empty: expected a header row, e.g. filepath,label or filepath,caption")
    return list(reader.fieldnames), rows


def _csv_column(path: Path, header: list[str], candidates: tuple[str, ...], what: str) -> str:
    for name in candidates:
        if name in header:
            return name
    raise EvalDataError(f"{path} has no {what} column: expected one of {', '.join(candidates)}; header is {header}")


def _csv_label(value: str, classnames: list[str], where: str) -> int:
    """A class index, or a class name looked up in the set's class names."""
    value = value.strip()
    if value.lstrip("-").isdigit():
        return int(value)
    if value in classnames:
        return classnames.index(value)
    raise EvalDataError(f"{where}: label {value!r} is neither a class index nor one of the {len(classnames)} class names")


def _csv_samples(eval_set: EvalSet) -> Iterator[RawSample]:
    """One sample per row (classification) or per distinct image, in order of first appearance (retrieval)."""
    path = eval_set.path
    header, rows = _csv_table(path)
    image_column = _csv_column(path, header, CSV_IMAGE_COLUMNS, "image path")
    if eval_set.task == CLASSIFICATION:
        _csv_column(path, header, (CSV_LABEL_COLUMN,), "class label")
    else:
        caption_column = _csv_column(path, header, CSV_CAPTION_COLUMNS, "caption")
    captions: dict[str, list[str]] = {}
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{path} line {number}"
        image_value = (row.get(image_column) or "").strip()
        if not image_value:
            raise EvalDataError(f"{where}: empty {image_column!r}")
        image = path.parent / image_value
        if eval_set.task == CLASSIFICATION:
            label = partial(_csv_label, row.get(CSV_LABEL_COLUMN) or "", eval_set.classnames, where)
            yield RawSample(image_value, f"{where} ({image})", partial(_read_file, image, where), label)
        else:
            caption = (row.get(caption_column) or "").strip()
            if not caption:
                raise EvalDataError(f"{where}: empty {caption_column!r}: every retrieval row needs a caption")
            captions.setdefault(image_value, []).append(caption)
    for image_value, image_captions in captions.items():
        image = path.parent / image_value
        yield RawSample(image_value, f"{path} ({image})", partial(_read_file, image, str(path)),
                        partial(list, image_captions))


# ---------------------------------------------------------------- decoding into batches


def _decode_image(data: bytes) -> Image.Image:
    """Fully decode (``load``) so truncated files fail here, not later inside the transform.

    Converted to RGB as webdataset's "pil" decoder (used by CLIP_benchmark) does.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")


def _decoded_share(eval_set: EvalSet, transform: Transform, report: DecodeReport) -> Iterator[tuple[torch.Tensor, Label, int]]:
    """``(transform(image), label, position)`` for this rank's share (every world-th sample).

    A strided share needs no counting pass over the set; positions restore the storage order.
    """
    rank, world = rank_and_size()
    for position, sample in enumerate(eval_set.samples()):
        if position % world != rank:
            continue
        label = sample.read_label()
        if eval_set.classnames is not None and not 0 <= label < len(eval_set.classnames):
            raise EvalDataError(f"{sample.where}: class index {label} is outside [0, {len(eval_set.classnames)}) "
                                f"(the set has {len(eval_set.classnames)} class names)")
        data = sample.read_image()
        try:
            image = _decode_image(data)
        except DECODE_ERRORS as error:
            reason = _MEMORY_ADDRESS.sub("", f"{type(error).__name__}: {error}")
            logger.warning("skipping undecodable image %s: %s", sample.where, reason)
            report.skipped.append(Skipped(sample.key, reason, position))
            continue
        yield transform(image), label, position


def eval_batches(
    eval_set: EvalSet,
    transform: Transform,
    batch_size: int,
    report: DecodeReport | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | list[list[str]], torch.Tensor]]:
    """``(images [B,3,H,W], labels, positions LongTensor [B])`` batches of this rank's share.

    Labels are a LongTensor of class indices (classification) or a list of caption lists
    (retrieval). Pass a ``DecodeReport`` to learn which images were skipped.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    samples = _decoded_share(eval_set, transform, report if report is not None else DecodeReport())
    batch: list[tuple[torch.Tensor, Label, int]] = []
    for item in samples:
        batch.append(item)
        if len(batch) == batch_size:
            yield _collate(batch, eval_set.task)
            batch = []
    if batch:
        yield _collate(batch, eval_set.task)


def _collate(batch: list[tuple[torch.Tensor, Label, int]], task: str):
    images = torch.stack([image for image, _, _ in batch])
    labels = [label for _, label, _ in batch]
    positions = torch.tensor([position for _, _, position in batch], dtype=torch.long)
    return images, (torch.tensor(labels, dtype=torch.long) if task == CLASSIFICATION else labels), positions
