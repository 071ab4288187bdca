"""The embedding stages of `vlm-curate run`: CLIP embed step, then clip_score → copy_dedup → semdedup →
decontaminate → retrieval → balance, on a real local Ray with real FAISS and a tiny random CLIP.

The pool is random-noise images (unrelated to each other) with planted copies: of eval images, of
pool images (duplicate groups), and seed images copied from the pool. Expected verdicts are
computed here by brute force (numpy) from the embeddings the embed step stored.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_pipeline.cli import format_funnel
from data_pipeline.cli import main as curate_main
from data_pipeline.config import load_curate_config
from data_pipeline.embed.jobs import EmbedError
from data_pipeline.pipeline import run
from data_pipeline.report import histogram_columns, write_report
from tests.pipeline.conftest import CAPTIONS, encode, noise_image, write_tar
from tests.helpers import TINY_CLIP as TINY, build_clip as build_model
from vlmtrain.checkpoint import write_export

pytestmark = pytest.mark.e2e
ORIGINALS, EVAL_IMAGES, PLANTED_EVAL = 40, 10, (1, 4, 7)
GROUPS = {0: 2, 1: 1, 2: 2}  # pool original → extra copies of it
SEEDS = (10, 11, 12)  # pool originals the seed folder holds copies of
COPY = 0.99  # cosine threshold that separates copies (≈1) from unrelated noise images (< 0.98 here)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random tiny CLIP export whose image embedding tells images apart.

    A random ViT's class token hardly depends on the image (all cosines > 0.86, so no threshold
    separates copies); with uniform attention (zero queries) and no class/position embedding it is
    the projected mean of the patch features, and unrelated noise images land apart."""
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    state = model.state_dict()
    for name, tensor in state.items():
        if name.startswith("visual.") and ("q_proj" in name or "class_embedding" in name or "positional" in name):
            tensor.zero_()
    export = tmp_path_factory.mktemp("tiny_clip") / "final"
    write_export(state, TINY, export, {})
    return export


def jpeg(seed: int) -> bytes:
    return encode(noise_image(seed), "JPEG", quality=90)


def as_png(data: bytes) -> bytes:
    """The same pixels in another file: a copy that only an embedding (or a pixel hash) recognises."""
    return encode(Image.open(io.BytesIO(data)).convert("RGB"), "PNG")


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """Pool shards, an eval set (vlm-eval webdataset layout) and a seed folder of image files."""
    root = tmp_path_factory.mktemp("planted")
    samples = [{"__key__": f"orig-{i:03d}", "jpg": jpeg(1000 + i), "txt": CAPTIONS[i % len(CAPTIONS)].encode()}
               for i in range(ORIGINALS)]
    evals = [jpeg(5000 + i) for i in range(EVAL_IMAGES)]
    samples += [{"__key__": f"evalcopy-{i}", "jpg": evals[i], "txt": CAPTIONS[i % 3].encode()} for i in PLANTED_EVAL]
    for original, copies in GROUPS.items():
        image = samples[original]["jpg"]
        samples += [{"__key__": f"copy-{original}-{c}", "png" if c % 2 == 0 else "jpg": as_png(image) if c % 2 == 0
                     else image, "txt": CAPTIONS[(original + c + 1) % len(CAPTIONS)].encode()} for c in range(copies)]
    samples += [{"__key__": f"junk-{i}", "jpg": jpeg(900 + i), "txt": b"hi"} for i in range(2)]  # heuristics
    (root / "pool").mkdir()
    write_tar(root / "pool" / "pool-000.tar", samples[:30])
    write_tar(root / "pool" / "pool-001.tar", samples[30:])
    (root / "eval" / "test").mkdir(parents=True)
    write_tar(root / "eval" / "test" / "000000.tar",
              [{"__key__": f"{i:06d}", "jpg": data, "cls": b"0"} for i, data in enumerate(evals)])
    (root / "seeds" / "nested").mkdir(parents=True)
    for n, i in enumerate(SEEDS):
        folder = root / "seeds" / ("nested" if n else "")
        (folder / f"seed-{i}.png").write_bytes(as_png(samples[i]["jpg"]))
    return {"root": root, "pool": root / "pool", "eval": root / "eval", "seeds": root / "seeds"}


def config(out: Path, planted: dict, model: Path, *overrides: str):
    return load_curate_config(None, [
        f"output_dir={out}", f"sources=[{{format: webdataset, path: '{planted['pool']}'}}]", "progress=false",
        "heuristics.min_image_side=32", "dedup.exact=false", "dedup.near=false", "output.samples_per_shard=20",
        f"embedding.model.checkpoint={model}", "embedding.embed.progress=false", "embedding.embed.batch_size=16",
        *overrides])


def stored_pool(out: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """The pool embeddings the embed step stored (float32, job order) and its index (uid, clip_score, ...)."""
    root = out / ".work" / "embeddings" / "pool"
    index = pd.read_parquet(root / "index.parquet")  # every job's rows, in job order
    stems = index["shard"].str.removesuffix(".parquet").unique()
    return np.concatenate([np.load(root / f"image-{stem}.npy") for stem in stems]).astype(np.float32), index


def stored_reference(out: Path, kind: str) -> np.ndarray:
    """The embeddings of the one eval or seed set of a run."""
    (folder,) = (out / ".work" / "embeddings" / kind).iterdir()
    return np.concatenate([np.load(p) for p in sorted(folder.glob("image-*.npy"))]).astype(np.float32)


def planted_group(key: str) -> int | None:
    """The duplicate group of a pool key: orig-000 and copy-0-<c> are group 0; other keys have none."""
    kind, number, *_ = key.split("-")
    return int(number) if kind in ("orig", "copy") and int(number) in GROUPS else None


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def snapshot(out: Path, manifest: dict, log: list[str]) -> dict:
    shards = sorted((out / "shards").glob("*.tar"))
    in_shards = [s["__key__"] for s in wds.WebDataset([str(p) for p in shards], shardshuffle=False)] if shards else []
    return {"out": out, "manifest": manifest, "log": log, "decisions": pd.read_parquet(out / "decisions.parquet"),
            "in_shards": in_shards}


@pytest.fixture(scope="module")
def dedup_run(planted, tiny_clip, tmp_path_factory, local_ray) -> dict:
    """copy_dedup + decontaminate on Ray (exact/near dedup off, so the embedding stages see every copy)."""
    out = tmp_path_factory.mktemp("embedding_run") / "out"
    log: list[str] = []
    cfg = config(out, planted, tiny_clip, "embedding.copy_dedup.enabled=true", "embedding.copy_dedup.k=8",
                 f"embedding.copy_dedup.threshold={COPY}", "embedding.decontaminate.enabled=true",
                 f"embedding.decontaminate.eval_sets=['{planted['eval']}']",
                 f"embedding.decontaminate.threshold={COPY}")
    manifest = run(cfg, ray_address=local_ray, log=log.append)
    return snapshot(out, manifest, log) | {"parts_mtime": part_mtimes(out)}


def part_mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / ".work" / "parts").glob("*.parquet")}


def test_decontamination_drops_exactly_the_planted_copies_of_eval_images(dedup_run, planted):
    decisions = dedup_run["decisions"]
    contaminated = decisions[decisions["reason"] == "eval_contamination"]
    assert sorted(contaminated["key"]) == [f"evalcopy-{i}" for i in PLANTED_EVAL]
    assert list(contaminated["nearest_eval"]) == [f"{planted['eval'] / 'test' / '000000.tar'}:{i:06d}"
                                                  for i in PLANTED_EVAL]
    # Brute force over the stored embeddings: the max cosine to any eval image of every row the stage saw.
    pool, index = stored_pool(dedup_run["out"])
    evals = unit(stored_reference(dedup_run["out"], "eval_sets"))
    nearest = pd.Series((unit(pool) @ evals.T).max(axis=1), index=index["uid"])
    seen = decisions[decisions["eval_similarity"].notna()]
    np.testing.assert_allclose(seen["eval_similarity"], nearest[seen["uid"]], atol=1e-5)
    assert set(seen.loc[nearest[seen["uid"]].to_numpy() >= COPY, "uid"]) == set(contaminated["uid"])


def test_the_report_shows_the_embedding_stages_scores_and_dropped_examples(dedup_run):
    page = write_report(dedup_run["out"]).read_text()
    assert [column for column, _ in histogram_columns(dedup_run["decisions"])] == [
        "caption_chars", "min_side", "aspect_ratio", "clip_score", "eval_similarity"]
    for reason, count in (("copy_duplicate", sum(GROUPS.values())), ("eval_contamination", len(PLANTED_EVAL))):
        assert f"<h3>{reason} ({count})</h3>" in page
    assert page.count("<img src='example-") >= sum(GROUPS.values()) + len(PLANTED_EVAL)


def test_copy_dedup_keeps_one_image_of_each_planted_group_and_names_it(dedup_run):
    decisions = dedup_run["decisions"].set_index("key")
    copies = decisions[decisions["reason"] == "copy_duplicate"]
    for original, extra in GROUPS.items():
        group = decisions.loc[[f"orig-{original:03d}"] + [f"copy-{original}-{c}" for c in range(extra)]]
        assert int(group["kept"].sum()) == 1 and (group["copy_group_size"] == extra + 1).all()
        survivor = group.loc[group["kept"], "uid"].iloc[0]
        assert (group.loc[~group["kept"], "copy_duplicate_of"] == survivor).all()
        # The group's best caption match survives.
        assert group.loc[group["kept"], "clip_score"].iloc[0] == group["clip_score"].max()
    assert len(copies) == sum(GROUPS.values())


def test_every_row_is_accounted_for_and_the_shards_hold_exactly_the_kept_rows(dedup_run):
    decisions, manifest = dedup_run["decisions"], dedup_run["manifest"]
    rows = manifest["funnel"]["rows"]
    read = ORIGINALS + len(PLANTED_EVAL) + sum(GROUPS.values()) + 2
    assert len(decisions) == rows["read"] == read
    assert rows["kept"] + int((~decisions["kept"]).sum()) == read
    assert sorted(dedup_run["in_shards"]) == sorted(decisions.loc[decisions["kept"], "uid"])
    assert list(rows) == ["read", "validate", "heuristics", "exact_dedup", "near_dedup", "copy_dedup",
                          "decontaminate", "kept"]
    assert rows["near_dedup"] - rows["copy_dedup"] == sum(GROUPS.values())
    assert rows["copy_dedup"] - rows["decontaminate"] == len(PLANTED_EVAL) == rows["copy_dedup"] - rows["kept"]
    assert "near_dedup 48 → copy_dedup 43 → decontaminate 40\n" in format_funnel(manifest["funnel"])
    assert "clip_score" not in format_funnel(manifest["funnel"])
    # Every candidate (kept by heuristics) carries the CLIP score the embed stage stored for it.
    _, index = stored_pool(dedup_run["out"])
    candidates = decisions[decisions["reason"].isna() | decisions["reason"].isin(["copy_duplicate",
                                                                                  "eval_contamination"])]
    scores = index.set_index("uid")["clip_score"]
    assert set(candidates["uid"]) == set(scores.index)
    np.testing.assert_array_equal(candidates["clip_score"].to_numpy(np.float32), scores[candidates["uid"]].to_numpy())
    assert decisions.loc[decisions["reason"] == "min_caption_words", "clip_score"].isna().all()


@pytest.fixture(scope="module")
def rescore_run(dedup_run, planted, tiny_clip, local_ray) -> dict:
    """The same output_dir, only the embedding section changed: CLIP-score top half, then seed retrieval."""
    log: list[str] = []
    cfg = config(dedup_run["out"], planted, tiny_clip, "embedding.clip_score.enabled=true",
                 "embedding.clip_score.top_fraction=0.5", "embedding.retrieval.enabled=true",
                 f"embedding.retrieval.seed_sets=['{planted['seeds']}']", "embedding.retrieval.k=3")
    manifest = run(cfg, ray_address=local_ray, log=log.append)
    return snapshot(dedup_run["out"], manifest, log) | {"parts_mtime": part_mtimes(dedup_run["out"])}


def test_changing_only_the_embedding_section_reuses_scored_parts_and_pool_embeddings(dedup_run, rescore_run):
    assert rescore_run["parts_mtime"] == dedup_run["parts_mtime"]
    assert not any("starting over" in line for line in rescore_run["log"])
    assert any("2 job(s) embedded (2 from an earlier run)" in line and "[pool]" in line for line in rescore_run["log"])
    assert any("(0 from an earlier run)" in line and "seed_sets[0]" in line for line in rescore_run["log"])


def test_clip_score_top_fraction_keeps_the_best_ceil_f_n_candidates(rescore_run):
    decisions = rescore_run["decisions"]
    candidates = decisions[decisions["clip_score"].notna()]
    passed = candidates[~candidates["flag_clip_score"]]
    assert len(passed) == math.ceil(0.5 * len(candidates)) == rescore_run["manifest"]["funnel"]["rows"]["clip_score"]
    assert passed["clip_score"].min() >= candidates.loc[candidates["flag_clip_score"], "clip_score"].max()
    assert set(candidates.loc[candidates["flag_clip_score"], "reason"]) == {"clip_score_not_in_top_fraction"}


def test_retrieval_keeps_exactly_the_seed_images_nearest_neighbours(rescore_run, planted):
    decisions = rescore_run["decisions"]
    pool, index = stored_pool(rescore_run["out"])
    seeds = stored_reference(rescore_run["out"], "seed_sets")
    assert len(seeds) == len(SEEDS)  # the nested folder was searched too
    reached = decisions.loc[decisions["seed_hits"].notna(), "uid"].to_numpy()
    vectors = unit(pool[index.set_index("uid").index.get_indexer(reached)])
    nearest = np.argsort(-(unit(seeds) @ vectors.T), axis=1)[:, :3]
    assert set(decisions.loc[decisions["kept"], "uid"]) == set(reached[nearest.ravel()])
    assert set(decisions.loc[decisions["seed_hits"] == 0, "reason"]) == {"not_retrieved"}
    assert sorted(rescore_run["in_shards"]) == sorted(decisions.loc[decisions["kept"], "uid"])


def test_semdedup_and_balanced_sampling_run_in_process_and_keep_the_target_size(dedup_run, planted, tiny_clip):
    log: list[str] = []
    cfg = config(dedup_run["out"], planted, tiny_clip, "embedding.semdedup.enabled=true",
                 "embedding.semdedup.n_clusters=4", f"embedding.semdedup.epsilon={1 - COPY}",
                 "embedding.balance.enabled=true", "embedding.balance.target_size=20",
                 "embedding.balance.n_clusters=[6, 2]", "embedding.balance.resample_size=[3, 2]")
    manifest = run(cfg, use_ray=False, log=log.append)
    decisions = pd.read_parquet(dedup_run["out"] / "decisions.parquet")
    semantic = decisions[decisions["reason"] == "semantic_duplicate"]
    group = decisions.set_index("uid")["key"].map(planted_group)
    assert sorted(group[semantic["uid"]]) == sorted(o for o, n in GROUPS.items() for _ in range(n))
    assert (group[semantic["semdedup_duplicate_of"]].to_numpy() == group[semantic["uid"]].to_numpy()).all()
    assert (semantic["semdedup_similarity"] > COPY).all()
    assert manifest["funnel"]["rows"]["kept"] == 20 == int(decisions["kept"].sum())
    assert list(manifest["funnel"]["rows"])[-3:] == ["semdedup", "balance", "kept"]


def test_a_pool_with_every_row_rejected_before_embedding_still_writes_an_empty_result(planted, tiny_clip, tmp_path):
    log: list[str] = []
    cfg = config(tmp_path / "out", planted, tiny_clip, "heuristics.min_caption_words=50",
                 "embedding.clip_score.enabled=true", "embedding.copy_dedup.enabled=true")
    manifest = run(cfg, use_ray=False, log=log.append)
    assert any("no rows left after heuristics and dedup; the embed step and the embedding stages are skipped" in line
               for line in log)
    assert manifest["funnel"]["rows"]["kept"] == 0 and manifest["shards"] == []
    assert len(pd.read_parquet(tmp_path / "out" / "decisions.parquet")) == manifest["funnel"]["rows"]["read"]


def test_retrieval_warnings_about_a_small_pool_and_seeds_without_neighbours_reach_the_log(
        dedup_run, planted, tiny_clip, tmp_path):
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "copy.png").write_bytes(as_png(jpeg(1000 + SEEDS[0])))
    (seeds / "stranger.png").write_bytes(encode(noise_image(7777), "PNG"))
    log: list[str] = []
    cfg = config(dedup_run["out"], planted, tiny_clip, "embedding.retrieval.enabled=true",
                 f"embedding.retrieval.seed_sets=['{seeds}']", "embedding.retrieval.k=1000",
                 f"embedding.retrieval.min_similarity={COPY}")
    manifest = run(cfg, use_ray=False, log=log.append)
    assert any(line.startswith("retrieval: warning: k=1000 is larger than") for line in log), log
    assert any(line.startswith("retrieval: warning: seeds: 1 of 2 seed images retrieved nothing") for line in log)
    assert manifest["funnel"]["rows"]["kept"] == 1  # the copy finds its original, the stranger nothing


def test_missing_or_empty_reference_folders_and_bad_seed_images_are_named(planted, tiny_clip, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    base = [f"embedding.model.checkpoint={tiny_clip}", "embedding.decontaminate.enabled=true"]
    common = ["output_dir=" + str(tmp_path / "out"), f"sources=[{{format: webdataset, path: '{planted['pool']}'}}]",
              "progress=false", "heuristics.min_image_side=32", "embedding.embed.progress=false"]
    for folder, message in ((tmp_path / "nowhere", "folder not found"),
                            (tmp_path / "empty", "holds no .tar shards and no image files")):
        code = curate_main(["run", str(empty_yaml(tmp_path)), *common, *base,
                            f"embedding.decontaminate.eval_sets=['{folder}']", "--no-ray"])
        err = capsys.readouterr().err
        assert code == 2 and "embedding.decontaminate.eval_sets[0]: " in err and str(folder) in err and message in err
        assert (tmp_path / "out" / ".work" / "parts").is_dir() == (folder.name == "empty")  # missing: fails first
    bad = tmp_path / "bad_seeds"
    bad.mkdir()
    (bad / "good.png").write_bytes(encode(noise_image(1), "PNG"))
    (bad / "broken.jpg").write_bytes(b"not a jpeg at all")
    cfg = config(tmp_path / "out", planted, tiny_clip, "embedding.retrieval.enabled=true",
                 f"embedding.retrieval.seed_sets=['{bad}']")
    with pytest.raises(EmbedError, match=f"{bad / 'broken.jpg'}: .*undecodable image"):
        run(cfg, use_ray=False, log=lambda line: None)


def empty_yaml(folder: Path) -> Path:
    path = folder / "curate.yaml"
    path.write_text("{}\n")
    return path
