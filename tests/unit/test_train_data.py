"""The training loader: a deterministic order, an exact resume from its cursor, weighted source
mixing, shard resampling, and corrupt samples skipped and counted."""
import io
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from tests.helpers import loader_inputs, rewrite_captions_in_place
from vlmtrain.config import DataConfig, SourceConfig
from vlmtrain.data import build_train_loader, data_fingerprint, resolve_sources
from vlmtrain.errors import DataError

TRANSFORM, TOKENIZER = loader_inputs(image_size=16, context_length=8)


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(directory: Path, prefix: str, shards: int, per_shard: int, corrupt: set[int] = frozenset()) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(directory / f"{prefix}-{s:03d}.tar")) as sink:
            for i in range(per_shard):
                n = s * per_shard + i
                image = b"not an image" if n in corrupt else png(n)
                sink.write({"__key__": f"{prefix}{n:05d}", "png": image, "txt": f"sample {n}".encode()})
    return directory


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("data") / "a", "a", shards=4, per_shard=24, corrupt={5, 50})


def loader(cfg: DataConfig, rank: int = 0, world: int = 2, cursor: dict | None = None):
    return build_train_loader(cfg, TRANSFORM, TOKENIZER, dp_rank=rank, dp_size=world, seed=7, cursor=cursor)


def take_keys(batches, count: int) -> list[list[str]]:
    return [next(batches).keys for _ in range(count)]


def test_the_order_is_a_pure_function_of_seed_and_rank(shards):
    cfg = DataConfig(train_shards=str(shards), batch_size=4, workers=2, shuffle_buffer=16)
    assert take_keys(loader(cfg), 10) == take_keys(loader(cfg), 10)
    rank0 = {k for batch in take_keys(loader(cfg, rank=0), 5) for k in batch}
    rank1 = {k for batch in take_keys(loader(cfg, rank=1), 5) for k in batch}
    assert not rank0 & rank1  # data-parallel ranks read disjoint shards


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_shows_every_sample_once_per_rank_even_with_a_buffer_larger_than_the_pool(tmp_path, workers):
    # 40 samples in 4 shards; 2 ranks: 20 samples a rank an epoch (4 batches of 5), buffer 1,000.
    pool = write_shards(tmp_path / "pool", "p", shards=4, per_shard=10)
    cfg = DataConfig(train_shards=str(pool), batch_size=5, workers=workers, shuffle_buffer=1000)
    for rank in (0, 1):
        batches = loader(cfg, rank=rank)
        epochs = [[k for batch in take_keys(batches, 4) for k in batch] for _ in range(3)]
        for keys in epochs:
            assert len(set(keys)) == 20, sorted(keys)
        assert epochs[0] != epochs[1]  # and each epoch has its own order


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("consumed", [3, 7])
def test_a_loader_built_from_the_cursor_continues_exactly(shards, workers, consumed):
    cfg = DataConfig(train_shards=str(shards), batch_size=4, workers=workers, shuffle_buffer=16)
    straight = loader(cfg)
    take_keys(straight, consumed)
    cursor = straight.cursor.to_dict()
    assert take_keys(loader(cfg, cursor=cursor), 12) == take_keys(straight, 12)


def test_resuming_with_another_worker_count_is_refused(shards):
    cfg = DataConfig(train_shards=str(shards), batch_size=4, workers=2)
    with pytest.raises(DataError, match="2 loader worker.*data.workers=2"):
        loader(DataConfig(train_shards=str(shards), batch_size=4, workers=1), cursor=loader(cfg).cursor.to_dict())


def test_corrupt_samples_are_skipped_and_counted(shards):
    cfg = DataConfig(train_shards=str(shards), batch_size=4, workers=0, shuffle_buffer=0)
    stream = loader(cfg, world=1)
    batches = [next(stream) for _ in range(24)]  # 96 samples: one epoch minus the 2 corrupt ones
    keys = [k for b in batches for k in b.keys]
    assert sum(b.skipped for b in batches) == 2
    assert not any(k.endswith(("a00005", "a00050")) for k in keys)


def test_sources_are_mixed_by_weight(tmp_path, shards):
    other = write_shards(tmp_path / "b", "b", shards=2, per_shard=24)
    cfg = DataConfig(sources=[SourceConfig(str(shards), 3.0), SourceConfig(str(other), 1.0)],
                     batch_size=8, workers=0, shuffle_buffer=0)
    keys = [k for batch in take_keys(loader(cfg, world=1), 50) for k in batch]
    share_a = sum(k.split("/")[0].startswith("a-") for k in keys) / len(keys)
    assert share_a == pytest.approx(0.75, abs=0.05)


def test_resampling_feeds_more_readers_than_there_are_shards(tmp_path):
    few = write_shards(tmp_path / "few", "f", shards=1, per_shard=12)
    with pytest.raises(DataError, match="1 shard.*cannot feed 2 rank.*data.resample=true"):
        loader(DataConfig(train_shards=str(few), batch_size=4, workers=1))
    batches = loader(DataConfig(train_shards=str(few), batch_size=4, workers=1, shuffle_buffer=0, resample=True))
    assert len({k for batch in take_keys(batches, 3) for k in batch}) == 12  # the one shard, whole


def test_the_fingerprint_changes_when_a_shard_changes(tmp_path):
    data = write_shards(tmp_path / "d", "d", shards=2, per_shard=4)
    cfg = DataConfig(train_shards=str(data))
    before = data_fingerprint(cfg, resolve_sources(cfg))
    write_shards(tmp_path / "d", "d", shards=1, per_shard=40)  # shard 0 rewritten, 10× the samples
    assert data_fingerprint(cfg, resolve_sources(cfg)) != before


def test_the_fingerprint_changes_when_a_shard_is_rewritten_at_the_same_size(tmp_path):
    data = write_shards(tmp_path / "d", "d", shards=2, per_shard=4)
    cfg = DataConfig(train_shards=str(data))
    before = data_fingerprint(cfg, resolve_sources(cfg))
    time.sleep(0.05)  # file times tick every few ms; a real rewrite comes long after the run began
    rewrite_captions_in_place(data / "d-000.tar", str.upper)
    assert data_fingerprint(cfg, resolve_sources(cfg)) != before
