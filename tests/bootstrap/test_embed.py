"""Specification of the embed stage: a Ray actor pool that stores float16 embeddings and the cosine per uid."""
from __future__ import annotations

import io
import itertools
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from webdataset import TarWriter

from data_pipeline.cli import main as curate_main
from data_pipeline.config import EmbedConfig, ModelSpec
from data_pipeline.embed.jobs import EmbedError, read_shard, shard_outputs
from data_pipeline.embed.workers import EmbedWorkers, embed_pool
from data_pipeline.shards import read_shard_members
from tests.conftest import REPO
from tests.helpers import TINY_CLIP as TINY, build_clip as build_model
from vlmtrain.checkpoint import write_export
from vlmtrain.models.clip.openclip import openclip_model_config, write_openclip_dir

os.environ.setdefault("RAY_TMPDIR", str(REPO / "build" / "ray"))
QUIET = EmbedConfig(progress=False, batch_size=64)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[torch.nn.Module, Path, Path]:
    """A random tiny CLIP as our export and as an open_clip folder holding the same weights."""
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    root = tmp_path_factory.mktemp("tiny_model")
    export = root / "final"
    write_export(model.state_dict(), TINY, export, {})
    return model, export, write_openclip_dir(model.state_dict(), TINY, root / "open_clip")


@pytest.fixture(scope="module")
def pool_shards(small_corpus, tmp_path_factory) -> list[str]:
    """Three shards of 120 of the generator's clean pairs, members copied as they are (its raw pool holds
    corrupt images on purpose)."""
    truth = pd.read_parquet(small_corpus / "train" / "index.parquet")
    clean = set(truth.loc[truth["noise"] == "clean", "key"])
    samples = (members for shard in sorted((small_corpus / "train").glob("*.tar"))
               for key, members in read_shard_members(str(shard)) if key in clean)
    out = tmp_path_factory.mktemp("clean")
    shards = [out / f"shard-{i:06d}.tar" for i in range(3)]
    for shard in shards:
        with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
            for info, data in itertools.chain.from_iterable(itertools.islice(samples, 120)):
                tar.addfile(info, io.BytesIO(data))
    return [str(p) for p in shards]


def open_clip_reference(folder: Path, shard: str) -> tuple[np.ndarray, np.ndarray]:
    """A bare single-process open_clip forward over one shard: normalised image and text features."""
    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    samples = list(read_shard(shard))
    with torch.no_grad():
        pixels = torch.stack([transform(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in samples])
        image = F.normalize(model.eval().encode_image(pixels), dim=-1)
        text = F.normalize(model.encode_text(tokenizer([s.caption for s in samples])), dim=-1)
    return image.numpy(), text.numpy()


def test_ray_embed_stage_matches_a_bare_open_clip_forward_and_a_rerun_embeds_only_missing_shards(
        tiny_model, pool_shards, tmp_path):
    _, export, folder = tiny_model
    out = tmp_path / "emb"
    index = embed_pool(pool_shards, out, ModelSpec(checkpoint=str(export)), QUIET, use_ray=True)

    assert list(index.columns) == ["uid", "key", "row", "clip_score", "shard"] and index["uid"].is_unique
    for shard in pool_shards:
        files = shard_outputs(out, shard)
        image, text = np.load(files["image"]), np.load(files["text"])
        assert image.dtype == text.dtype == np.float16 and image.shape[1] == TINY.embed_dim
        ref_image, ref_text = open_clip_reference(folder, shard)
        np.testing.assert_allclose(image, ref_image, atol=2e-3)  # float16 storage of unit vectors
        np.testing.assert_allclose(text, ref_text, atol=2e-3)
        rows = index[index["shard"] == Path(shard).name].sort_values("row")
        assert list(rows["uid"]) == [s.uid for s in read_shard(shard)]
        np.testing.assert_allclose(rows["clip_score"], (ref_image * ref_text).sum(1), atol=1e-5)

    finished = {s: shard_outputs(out, s)["image"].stat().st_mtime_ns for s in pool_shards[1:]}
    shard_outputs(out, pool_shards[0])["index"].unlink()  # as if killed before the first shard finished
    messages = []
    again = embed_pool(pool_shards, out, ModelSpec(checkpoint=str(export)), QUIET, use_ray=False,
                       log=messages.append)
    assert "3 job(s) embedded (2 from an earlier run)" in messages[0]
    assert {s: shard_outputs(out, s)["image"].stat().st_mtime_ns for s in pool_shards[1:]} == finished
    pd.testing.assert_frame_equal(again, index)


def test_one_set_of_actors_serves_several_calls_and_refuses_another_model(tiny_model, pool_shards, tmp_path):
    _, export, folder = tiny_model
    spec = ModelSpec(checkpoint=str(export))
    with EmbedWorkers(spec, QUIET) as workers:
        first = embed_pool(pool_shards[:2], tmp_path / "a", spec, QUIET, workers=workers)
        actors = list(workers.pool.actors)
        second = embed_pool(pool_shards, tmp_path / "b", spec, QUIET, workers=workers)
        assert workers.pool.actors == actors and len(actors) == QUIET.workers  # no model loaded twice
        with pytest.raises(ValueError, match="the workers run"):
            embed_pool(pool_shards[:1], tmp_path / "c", ModelSpec(open_clip_model=f"local-dir:{folder}"), QUIET,
                       workers=workers)
    pd.testing.assert_frame_equal(second[second["shard"].isin({Path(s).name for s in pool_shards[:2]})], first)


def test_open_clip_model_with_a_local_weights_file_gives_the_embeddings_of_the_same_weights_in_ours(
        tiny_model, pool_shards, tmp_path):
    _, export, folder = tiny_model
    ours = embed_pool(pool_shards[:1], tmp_path / "ours", ModelSpec(checkpoint=str(export)), QUIET, use_ray=False)
    name = "vlmtrain-test-embed-tiny"
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / f"{name}.json").write_text(json.dumps(openclip_model_config(TINY)))
    open_clip.add_model_config(configs)  # how users register their own architecture
    weights = next(folder.glob("*.safetensors"))
    theirs = embed_pool(pool_shards[:1], tmp_path / "theirs", ModelSpec(open_clip_model=name, pretrained=str(weights)),
                        QUIET, use_ray=False)
    np.testing.assert_allclose(theirs["clip_score"], ours["clip_score"], atol=1e-5)


def test_a_different_model_starts_the_embeddings_over(tiny_model, pool_shards, tmp_path):
    _, export, folder = tiny_model
    embed_pool(pool_shards[:1], tmp_path, ModelSpec(checkpoint=str(export)), QUIET, use_ray=False)
    messages = []
    embed_pool(pool_shards[:1], tmp_path, ModelSpec(open_clip_model=f"local-dir:{folder}"), QUIET, use_ray=False,
               log=messages.append)
    assert "embeddings of another model found; starting over" in messages[0]
    assert "(0 from an earlier run)" in messages[1]


def test_empty_pool_and_bad_samples_get_clear_errors(tiny_model, tmp_path, capsys):
    _, export, _ = tiny_model
    with pytest.raises(EmbedError, match="the pool has nothing to embed"):
        embed_pool([], tmp_path / "none", ModelSpec(checkpoint=str(export)), QUIET)
    empty = tmp_path / "empty_shards"
    empty.mkdir()
    assert curate_main(["embed", str(empty), str(tmp_path / "out"), "--checkpoint", str(export), "--no-ray"]) == 2
    assert "the pool has nothing to embed (no shards" in capsys.readouterr().err

    bad = tmp_path / "bad-000.tar"
    with TarWriter(str(bad), encoder=False) as tar:
        tar.write({"__key__": "broken", "jpg": b"not a jpeg", "txt": b"a red circle"})
    for use_ray in (False, True):
        with pytest.raises(EmbedError, match=r"bad-000.tar: sample 'broken': undecodable image"):
            embed_pool([str(bad)], tmp_path / f"bad-{use_ray}", ModelSpec(checkpoint=str(export)), QUIET, use_ray)
