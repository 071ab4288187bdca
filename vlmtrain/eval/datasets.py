"""Read zero-shot evaluation sets stored in CLIP_benchmark's webdataset layout.

    DATASET_DIR/classnames.txt                          one class name per line
    DATASET_DIR/zeroshot_classification_templates.txt  one template per line, containing "{c}"
    DATASET_DIR/test/*.tar                              samples with "jpg" (or jpeg/png/webp),
                                                        "cls" (class index as ASCII text) and/or
                                                        "txt" (captions, one per line)

Undecodable images are skipped and recorded in a ``DecodeReport`` instead of aborting
the run: one bad JPEG in 50k must not cost a whole evaluation, but it must be visible,
because it changes the denominator.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import webdataset
from PIL import Image

logger = logging.getLogger(__name__)

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
SPLIT_DIR = "test"
# The extensions CLIP_benchmark's wds loader accepts, in its order of preference.
IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")
# What PIL raises for bytes that are not a readable image: unidentified/truncated files
# (OSError), broken headers (SyntaxError, ValueError, EOFError), decompression bombs.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

Transform = Callable[[Image.Image], torch.Tensor]
Item = TypeVar("Item")


class EvalDataError(ValueError):
    """An evaluation set is missing or malformed; the message names the path/key and the fix."""


@dataclass
class DecodeReport:
    """Images skipped because they could not be decoded, as ``(key, reason)`` pairs.

    Pass one to a batch iterator; it is filled while iterating, so read it afterwards.
    """

    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self, limit: int = 10) -> str:
        """One line for logs, e.g. ``skipped 2 undecodable images: a (OSError: ...), b (...)``."""
        shown = ", ".join(f"{key} ({reason})" for key, reason in self.skipped[:limit])
        more = f", ... and {len(self.skipped) - limit} more" if len(self.skipped) > limit else ""
        return f"skipped {len(self.skipped)} undecodable images: {shown}{more}"


def _read_lines(path: Path, what: str) -> list[str]:
    """Stripped non-blank lines of a metadata file, which must exist and not be empty.

    Blank lines are only tolerated at the end: in the middle of classnames.txt one
    would shift every following class index.
    """
    if not path.is_file():
        raise EvalDataError(f"{path} not found: a zero-shot classification set needs {what}, one per line")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise EvalDataError(f"{path} is empty: write {what} into it, one per line")
    if "" in lines:
        raise EvalDataError(
            f"{path} line {lines.index('') + 1} is blank: remove it, every line must hold one of {what}"
        )
    return lines


def load_classnames_and_templates(dataset_dir: str | Path) -> tuple[list[str], list[str]]:
    """Class names (line i = class index i) and prompt templates of a classification set."""
    dataset_dir = Path(dataset_dir)
    classnames = _read_lines(dataset_dir / CLASSNAMES_FILE, "class names")
    templates_path = dataset_dir / TEMPLATES_FILE
    templates = _read_lines(templates_path, 'prompt templates containing "{c}"')
    for number, template in enumerate(templates, start=1):
        if "{c}" not in template:
            raise EvalDataError(
                f'{templates_path} line {number} ({template!r}) has no "{{c}}" placeholder for the class name'
            )
    return classnames, templates


def _natural_key(path: Path) -> list[Any]:
    """Sort key putting 2.tar before 10.tar, so shards are read in CLIP_benchmark's 0..n-1 order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def shard_paths(dataset_dir: str | Path) -> list[str]:
    """The test split's tar shards in a deterministic order; error if there are none."""
    split_dir = Path(dataset_dir) / SPLIT_DIR
    shards = sorted(split_dir.glob("*.tar"), key=_natural_key)
    if not shards:
        raise EvalDataError(
            f"no shards found: expected {split_dir}/*.tar (CLIP_benchmark webdataset layout); "
            "point the evaluation at the directory that contains test/, or write the shards first"
        )
    return [str(path) for path in shards]


def _samples(shards: list[str]) -> Iterator[dict[str, Any]]:
    """Raw samples of all shards in order, undecoded.

    Every process reads every shard: no node/worker splitting, which webdataset would
    otherwise refuse (or silently apply) under torch.distributed.
    """
    dataset = webdataset.WebDataset(
        shards, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
    )
    return iter(dataset)


def _where(sample: dict[str, Any]) -> str:
    """``key 'x' in /path/0.tar`` for error messages."""
    return f"sample {sample['__key__']!r} in {sample.get('__url__', '?')}"


def _image_bytes(sample: dict[str, Any]) -> bytes:
    """The sample's encoded image, whichever supported extension it uses."""
    for extension in IMAGE_EXTENSIONS:
        if extension in sample:
            return sample[extension]
    fields = sorted(name for name in sample if not name.startswith("__"))
    raise EvalDataError(
        f"{_where(sample)} has no image: expected a member named <key>.jpg (or .{', .'.join(IMAGE_EXTENSIONS)}), "
        f"found {fields}"
    )


def _decode_image(data: bytes) -> Image.Image:
    """Fully decode (``load``) so truncated files fail here, not later inside the transform.

    Converted to RGB as webdataset's "pil" decoder (used by CLIP_benchmark) does.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")


def _class_index(sample: dict[str, Any]) -> int:
    """The ``cls`` field: the class index as ASCII text."""
    if "cls" not in sample:
        raise EvalDataError(f"{_where(sample)} has no .cls member: classification samples need their class index")
    raw = sample["cls"]
    try:
        return int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise EvalDataError(
            f"{_where(sample)}: .cls must be an integer class index as ASCII text, got {raw!r}"
        ) from None


def _captions(sample: dict[str, Any]) -> list[str]:
    """The ``txt`` field split into one caption per line (CLIP_benchmark: ``str.splitlines``)."""
    if "txt" not in sample:
        raise EvalDataError(f"{_where(sample)} has no .txt member: retrieval samples need their captions")
    captions = [line.strip() for line in sample["txt"].decode("utf-8").splitlines() if line.strip()]
    if not captions:
        raise EvalDataError(f"{_where(sample)} has an empty .txt: every retrieval image needs a caption")
    return captions


def _decoded(
    dataset_dir: str | Path,
    shards: list[str],
    transform: Transform,
    label: Callable[[dict[str, Any]], Item],
    report: DecodeReport,
) -> Iterator[tuple[torch.Tensor, Item]]:
    """``(transform(image), label(sample))`` per sample, skipping and reporting undecodable images."""
    decoded = 0
    for sample in _samples(shards):
        target = label(sample)
        data = _image_bytes(sample)
        try:
            image = _decode_image(data)
        except DECODE_ERRORS as error:
            reason = f"{type(error).__name__}: {error}"
            logger.warning("skipping undecodable image %s: %s", _where(sample), reason)
            report.skipped.append((sample["__key__"], reason))
            continue
        decoded += 1
        yield transform(image), target
    if decoded == 0:
        detail = f"; {report.summary(limit=3)}" if report.skipped else ""
        raise EvalDataError(f"no decodable samples in {dataset_dir}/{SPLIT_DIR} ({len(shards)} shards){detail}")


def _batched(items: Iterable[Item], batch_size: int) -> Iterator[list[Item]]:
    """Consecutive lists of ``batch_size`` items; the last may be shorter."""
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_batch_size(batch_size: int) -> None:
    """A non-positive batch size would loop forever or yield nothing."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _labelled_batches(
    dataset_dir: str | Path,
    transform: Transform,
    batch_size: int,
    label: Callable[[dict[str, Any]], Item],
    report: DecodeReport | None,
) -> Iterator[tuple[torch.Tensor, list[Item]]]:
    """``(images [B,3,H,W], [label(sample) ...])``; shard problems raise here, at call time."""
    _check_batch_size(batch_size)
    shards = shard_paths(dataset_dir)
    samples = _decoded(dataset_dir, shards, transform, label, report if report is not None else DecodeReport())
    return ((torch.stack([image for image, _ in batch]), [item for _, item in batch])
            for batch in _batched(samples, batch_size))


def classification_batches(
    dataset_dir: str | Path,
    transform: Transform,
    batch_size: int,
    report: DecodeReport | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images [B,3,H,W], targets LongTensor [B])`` batches of the test split.

    Missing shards raise ``EvalDataError`` here, at call time, not at first iteration.
    Pass a ``DecodeReport`` to learn which images were skipped.
    """
    batches = _labelled_batches(dataset_dir, transform, batch_size, _class_index, report)
    return ((images, torch.tensor(targets, dtype=torch.long)) for images, targets in batches)


def retrieval_batches(
    dataset_dir: str | Path,
    transform: Transform,
    batch_size: int,
    report: DecodeReport | None = None,
) -> Iterator[tuple[torch.Tensor, list[list[str]]]]:
    """``(images [B,3,H,W], captions)`` batches, ``captions[i]`` being image i's caption list.

    Missing shards raise ``EvalDataError`` here, at call time, not at first iteration.
    Pass a ``DecodeReport`` to learn which images were skipped.
    """
    return _labelled_batches(dataset_dir, transform, batch_size, _captions, report)
