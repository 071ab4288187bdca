"""Training data: webdataset shards → (image tensor, token ids) batches, split by data-parallel rank.

Shards are split by *data-parallel* rank (not global rank) so that tensor/pipeline peers see the
same batch. The order is a pure function of (seed, epoch, dp_rank, worker): every epoch the shard
list is permuted with (seed, epoch), each rank takes every dp_size-th shard, and each loader
worker every num_workers-th of those. The stream is endless; the trainer counts steps.
"""
from __future__ import annotations

import glob
import io
import itertools
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import braceexpand
import numpy as np
import open_clip
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlmtrain.config import DataConfig, TextConfig, VisionConfig

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class DataError(ValueError):
    """A user-facing problem with the training data (missing path, no shards, too few shards)."""


def make_tokenizer(cfg: TextConfig) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's BPE tokenizer (its vocabulary ships in the wheel: no download)."""
    return open_clip.tokenizer.SimpleTokenizer(context_length=cfg.context_length)


def make_image_transform(cfg: VisionConfig, train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's transforms with the OpenAI mean/std, so eval matches open_clip exactly."""
    return open_clip.image_transform(cfg.image_size, is_train=train)


def resolve_shards(spec: str, key: str = "data.train_shards") -> list[str]:
    """A directory (all ``*.tar`` in it), a brace pattern ``a-{000..009}.tar``, or a glob."""
    if not spec:
        raise DataError(f"{key} is empty: give a directory of .tar shards or a pattern")
    path = Path(spec)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise DataError(f"{key}: no .tar shards in directory {spec}")
        return shards
    if "{" in spec:
        shards = list(braceexpand.braceexpand(spec))
    else:
        shards = sorted(glob.glob(spec))
    missing = [s for s in shards if not Path(s).is_file()]
    if not shards or missing:
        raise DataError(f"{key}: no such shard or directory: {missing[0] if missing else spec}")
    return shards


def check_enough_shards(shards: list[str], dp_size: int, workers: int) -> None:
    """Every loader worker of every rank reads whole shards, so each needs at least one."""
    workers = max(workers, 1)  # workers=0 reads in the main process: still one reader
    if len(shards) < dp_size * workers:
        raise DataError(f"data.train_shards: {len(shards)} shard(s) cannot feed {dp_size} rank(s) × "
                        f"{workers} worker(s); write more shards or lower data.workers")


def decode_image(sample: dict) -> Image.Image | None:
    for key in IMAGE_KEYS:
        if key in sample:
            try:
                with Image.open(io.BytesIO(sample[key])) as image:
                    return image.convert("RGB")
            except Exception as err:  # PIL raises many types for bad bytes
                log.debug("skipping %s: undecodable image (%s)", sample.get("__key__"), err)
                return None
    return None


def decode_caption(sample: dict) -> str | None:
    raw = sample.get("txt")
    if raw is None:
        return None
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None


@dataclass
class TrainStream(IterableDataset):
    """Endless stream of ``(image, tokens, skipped_before)`` for one data-parallel rank.

    ``skipped_before`` counts the corrupt samples dropped since the previous yield, so the
    trainer can sum it per batch without any side channel out of loader workers.
    """
    shards: list[str]
    dp_rank: int
    dp_size: int
    seed: int
    shuffle_buffer: int
    transform: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]

    def __post_init__(self) -> None:
        super().__init__()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        skipped = 0
        for epoch in itertools.count():
            for sample in self._epoch_samples(epoch, worker, workers):
                image, caption = decode_image(sample), decode_caption(sample)
                if image is None or caption is None:
                    skipped += 1
                    continue
                yield self.transform(image), self.tokenizer([caption])[0], skipped
                skipped = 0

    def _epoch_samples(self, epoch: int, worker: int, workers: int) -> Iterator[dict]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        mine = [self.shards[i] for i in order[self.dp_rank::self.dp_size][worker::workers]]
        samples = wds.tarfile_to_samples(handler=wds.warn_and_continue)(iter([{"url": u} for u in mine]))
        if self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}/{epoch}/{self.dp_rank}/{worker}")
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        return samples


def build_train_loader(cfg: DataConfig, vision: VisionConfig, text: TextConfig, *, dp_rank: int,
                       dp_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    shards = resolve_shards(cfg.train_shards)
    check_enough_shards(shards, dp_size, cfg.workers)
    stream = TrainStream(shards, dp_rank, dp_size, seed, cfg.shuffle_buffer,
                         make_image_transform(vision, train=True), make_tokenizer(text))
    loader = DataLoader(stream, batch_size=cfg.batch_size, num_workers=cfg.workers,
                        persistent_workers=cfg.workers > 0, drop_last=True)
    return iter(loader)
