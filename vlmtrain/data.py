"""Training data: webdataset shards → (image, tokens) micro-batches for one data-parallel rank.

The sample order is a pure function of (seed, data-parallel rank, loader worker, position):

* Each *reader slot* (one per rank × loader worker) follows an endless shard sequence per source:
  whole-list epochs, each a fresh permutation split across slots (every shard once per epoch), or,
  with ``resample``, shards drawn with replacement.
* Shard samples pass a seeded shuffle buffer that is emptied at each epoch's end, so an epoch shows
  every sample at most once per rank whatever the buffer size; several sources are interleaved by
  a seeded weighted choice per position; random augmentation is seeded per position too.

So the loader's whole state is a cursor: how many raw samples each slot has consumed (corrupt ones
included) and which worker's batch comes next. Resuming replays the raw stream up to the cursor
without decoding, and the run continues as if it had never stopped. Tensor/pipeline peers share a
data-parallel rank, so they see the same batches.
"""
from __future__ import annotations

import atexit
import glob
import hashlib
import io
import itertools
import logging
import multiprocessing
import os
import random
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlmtrain.config import DataConfig
from vlmtrain.errors import DataError

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


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


def resolve_sources(cfg: DataConfig) -> list[list[str]]:
    """The shard list of every source, in config order."""
    if cfg.train_shards:
        return [resolve_shards(cfg.train_shards)]
    return [resolve_shards(source.shards, f"data.sources[{i}].shards")
            for i, source in enumerate(cfg.sources)]


def check_enough_shards(cfg: DataConfig, sources: list[list[str]], dp_size: int) -> None:
    """Epoch mode splits each source's shards across reader slots, so each slot needs one."""
    if cfg.resample:
        return  # every slot draws from the whole list
    slots = dp_size * max(cfg.workers, 1)  # workers=0 reads in the main process: one slot
    for i, shards in enumerate(sources):
        if len(shards) < slots:
            key = "data.train_shards" if cfg.train_shards else f"data.sources[{i}].shards"
            raise DataError(f"{key}: {len(shards)} shard(s) cannot feed {dp_size} rank(s) × "
                            f"{max(cfg.workers, 1)} worker(s); write more shards, lower data.workers "
                            f"or set data.resample=true")


def data_fingerprint(cfg: DataConfig, sources: list[list[str]]) -> str:
    """Hash of what the data is (shard names, weights, order options, and each shard's size, mtime_ns and
    inode, so a shard rewritten at the same size counts as changed), for resume checks. The shards are
    not read: hashing a large pool's content at every start would cost minutes."""
    digest = hashlib.sha256()
    weights = [s.weight for s in cfg.source_list()]
    digest.update(repr((cfg.resample, cfg.shuffle_buffer, weights)).encode())
    for shards in sources:
        for shard in shards:
            st = os.stat(shard)
            digest.update(f"{Path(shard).name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino};".encode())
    return digest.hexdigest()[:16]


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


def sample_seed(seed: int, slot: int, position: int) -> int:
    """A well-mixed 63-bit seed per sample (splitmix64 finalizer): cheap enough to use per image."""
    x = (seed * 0x9E3779B97F4A7C15 + slot * 0xBF58476D1CE4E5B9 + position) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (x ^ (x >> 31)) >> 1


@dataclass
class ReaderSlot:
    """The raw, endless sample stream of one (rank, worker) slot: a pure function of its arguments."""
    sources: list[list[str]]
    weights: list[float]
    slot: int
    num_slots: int
    seed: int
    resample: bool
    shuffle_buffer: int

    def samples(self) -> Iterator[dict]:
        streams = [self._source_samples(i) for i in range(len(self.sources))]
        if len(streams) == 1:
            yield from streams[0]
            return
        chooser = np.random.default_rng([self.seed, self.slot, 1_000_003])
        probabilities = np.asarray(self.weights) / sum(self.weights)
        while True:
            yield next(streams[chooser.choice(len(streams), p=probabilities)])

    def _source_samples(self, source: int) -> Iterator[dict]:
        """One source's samples, epoch after epoch. The shuffle buffer is per epoch and empties at
        the epoch's end: a buffer larger than the slot's share of the pool would otherwise mix the
        next epoch's copies of the same samples into this one."""
        for epoch, shards in enumerate(self._shard_epochs(source)):
            samples = wds.tarfile_to_samples(handler=wds.warn_and_continue)({"url": url} for url in shards)
            if self.shuffle_buffer > 1:
                rng = random.Random(f"{self.seed}/{source}/{self.slot}/{epoch}")
                samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
            yield from samples

    def _shard_epochs(self, source: int) -> Iterator[Iterator[str]]:
        """This slot's shards, epoch by epoch: its share of a fresh permutation of the whole list each
        epoch (every shard once per epoch across slots), or, with ``resample``, one endless epoch
        of shards drawn with replacement."""
        shards = self.sources[source]
        if self.resample:
            rng = np.random.default_rng([self.seed, source, self.slot])
            yield (shards[rng.integers(len(shards))] for _ in itertools.count())
            return
        for epoch in itertools.count():
            order = np.random.default_rng([self.seed, source, epoch]).permutation(len(shards))
            yield (shards[i] for i in order[self.slot::self.num_slots])


@dataclass
class TrainStream(IterableDataset):
    """One rank's samples as ``(image, tokens, extras, key, worker, position, skipped_before)``.

    ``worker`` is the *logical* reader slot within the rank and ``position`` the number of raw
    samples that slot has consumed after this one; ``skipped_before`` counts corrupt samples dropped
    since the previous yield. ``start_positions`` (one per logical worker) resumes mid-stream;
    ``worker_offset`` makes DataLoader worker w play logical worker (w + offset) % workers, so the
    round-robin batch order continues where the cursor says. ``extras`` are what ``sample_inputs``
    (the model family's, if any) makes of the transformed image and the tokens, under the sample's seed.
    """
    sources: list[list[str]]
    weights: list[float]
    dp_rank: int
    dp_size: int
    workers: int
    seed: int
    resample: bool
    shuffle_buffer: int
    transform: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    start_positions: list[int] = field(default_factory=list)
    worker_offset: int = 0
    sample_inputs: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        super().__init__()

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.worker_offset) % self.workers
        slot = self.dp_rank * self.workers + worker
        reader = ReaderSlot(self.sources, self.weights, slot, self.dp_size * self.workers, self.seed,
                            self.resample, self.shuffle_buffer)
        start = self.start_positions[worker] if self.start_positions else 0
        raw = itertools.islice(reader.samples(), start, None)  # replay without decoding
        skipped = 0
        for position, sample in enumerate(raw, start=start + 1):
            image, caption = decode_image(sample), decode_caption(sample)
            if image is None or caption is None:
                skipped += 1
                continue
            # Augmentation by position. (The CPU generator alone: torch.manual_seed costs 100× more.)
            torch.random.default_generator.manual_seed(sample_seed(self.seed, slot, position))
            key = f"{Path(sample.get('__url__', '')).name}/{sample.get('__key__')}"
            pixels, tokens = self.transform(image), self.tokenizer([caption])[0]
            extras = self.sample_inputs(pixels, tokens) if self.sample_inputs else {}
            yield pixels, tokens, extras, key, worker, position, skipped
            skipped = 0


@dataclass
class Batch:
    images: torch.Tensor
    tokens: torch.Tensor
    keys: list[str]
    skipped: int  # corrupt samples dropped while filling this batch
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # the family's sample_inputs, batched


@dataclass
class LoaderCursor:
    """Where a rank's loader stands: raw samples consumed per logical worker, next worker."""
    positions: list[int]
    next_worker: int = 0

    def to_dict(self) -> dict:
        return {"positions": list(self.positions), "next_worker": self.next_worker}


def init_loader_worker(worker_id: int) -> None:
    """Each loader worker's start: it lives and dies by its rank."""
    ignore_stop_signals()
    die_with_rank()


def ignore_stop_signals() -> None:
    """Loader workers leave SIGTERM/SIGUSR1 to their rank, which saves and then shuts them down.

    SLURM's scancel signals every process of a job step; a worker dying of it would crash its rank
    before the rank could save.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def die_with_rank() -> None:
    """A loader worker is SIGKILLed as soon as its rank dies (Linux), however the rank dies.

    The worker is forked after the process group exists, so it holds the rank's gloo sockets too: while
    it lives, the peers of a rank killed by a signal see no closed connection and wait in their
    collective until torch's watchdog in the worker, which looks every 5 s, notices the orphan (a
    2-rank CPU run killed at a checkpoint failpoint: the other rank left its barrier 0.2-5.5 s later).
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the rank died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def kill_loader_workers() -> None:
    """At interpreter exit, SIGKILL the daemonic children (this rank's loader workers).

    multiprocessing's own exit hook stops them with SIGTERM, which they ignore, and then joins them
    without a timeout: a rank leaving by any path other than a finished loader would hang forever.
    Registered after that hook, this one runs before it (atexit is last in, first out).
    """
    # torch's SIGCHLD handler would report the killed workers as a loader failure during exit.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


class TrainLoader:
    """Iterator of ``Batch`` that tracks its own cursor, so it can be saved and resumed exactly."""

    def __init__(self, stream: TrainStream, batch_size: int, num_workers: int):
        self.cursor = LoaderCursor(positions=list(stream.start_positions) or [0] * stream.workers,
                                   next_worker=stream.worker_offset)
        self._loader = iter(DataLoader(stream, batch_size=batch_size, num_workers=num_workers,
                                       persistent_workers=num_workers > 0, drop_last=True,
                                       worker_init_fn=init_loader_worker))
        if num_workers > 0:
            atexit.unregister(kill_loader_workers)  # once, and after multiprocessing's own hook
            atexit.register(kill_loader_workers)

    def __iter__(self) -> "TrainLoader":
        return self

    def close(self) -> None:
        """Stop the loader workers now: torch shuts them down when their iterator is released."""
        self._loader = iter(())

    def __next__(self) -> Batch:
        images, tokens, extras, keys, workers, positions, skipped = next(self._loader)
        worker = int(workers[-1])
        self.cursor.positions[worker] = int(positions[-1])
        self.cursor.next_worker = (worker + 1) % len(self.cursor.positions)
        return Batch(images, tokens, list(keys), int(skipped.sum()), extras)


def build_train_loader(cfg: DataConfig, transform: Callable[[Image.Image], torch.Tensor],
                       tokenizer: Callable[[list[str]], torch.Tensor], *, dp_rank: int, dp_size: int, seed: int,
                       cursor: dict | None = None,
                       sample_inputs: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] | None = None,
                       ) -> TrainLoader:
    """The loader of one data-parallel rank (its tensor/pipeline peers build the same one), resumed
    from ``cursor`` (a ``LoaderCursor.to_dict()``) when given. The model family supplies the image
    ``transform``, the ``tokenizer`` and, if it has any, the per-sample ``sample_inputs``."""
    sources = resolve_sources(cfg)
    check_enough_shards(cfg, sources, dp_size)
    workers = max(cfg.workers, 1)
    start_positions, offset = [], 0
    if cursor is not None:
        if len(cursor["positions"]) != workers:
            raise DataError(f"the checkpoint's data cursor was written with {len(cursor['positions'])} "
                            f"loader worker(s) per rank; resume with data.workers={len(cursor['positions'])}")
        start_positions, offset = list(cursor["positions"]), int(cursor["next_worker"])
    stream = TrainStream(sources, [s.weight for s in cfg.source_list()], dp_rank, dp_size, workers, seed,
                         cfg.resample, cfg.shuffle_buffer, transform, tokenizer, start_positions, offset,
                         sample_inputs)
    return TrainLoader(stream, cfg.batch_size, cfg.workers)
