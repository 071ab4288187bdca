"""Specification of `vlm-curate bootstrap`: a scorer trained on the pool itself finds its mismatched captions.

The end-to-end numbers on the full 12k demo pool (≥ 80% of mismatched captions removed, ≥ 90% of clean
pairs kept, higher zero-shot top-1 after pruning) are tools/bench_bootstrap.py's; here a 1,200-pair pool
and a 150-step scorer must already show the effect.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from data_pipeline.bootstrap import BootstrapError, Pool, run_bootstrap
from data_pipeline.config import load_bootstrap_config, load_curate_config
from data_pipeline.pipeline import run as curate
from data_pipeline.stages.embed import read_shard
from tests.conftest import REPO, generate_corpus

pytestmark = pytest.mark.e2e
TOP_FRACTION = 0.75


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return generate_corpus(tmp_path_factory.mktemp("bootstrap_corpus"), seed=5, num_train=1200,
                           samples_per_shard=300, eval_per_class=2)


@pytest.fixture(scope="module")
def pool(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bootstrap_pool") / "curated"
    curate(load_curate_config(REPO / "configs" / "curate" / "demo.yaml", [
        f"output_dir={out}", f"sources=[{{format: webdataset, path: '{corpus / 'train'}'}}]",
        "output.samples_per_shard=250", "progress=false"]), use_ray=False, log=lambda _: None)
    return out


def bootstrap_config(corpus: Path, pool: Path, out: Path):
    return load_bootstrap_config(REPO / "configs" / "curate" / "bootstrap_demo.yaml", [
        f"pool={pool}", f"output_dir={out}", "nproc=1", f"eval_sets=[{corpus / 'eval' / 'shapes'}]",
        f"ground_truth={corpus / 'train' / 'index.parquet'}", f"clip_score.top_fraction={TOP_FRACTION}",
        "train_overrides=[steps=150, data.batch_size=64, zero_stage=0, optim.warmup_steps=20, progress=false, "
        "metrics.tensorboard=false]", "embed.progress=false", "samples_per_shard=300"])


def test_a_scorer_bootstrapped_from_the_pool_prunes_mostly_mismatched_captions_and_a_rerun_resumes(
        corpus, pool, tmp_path):
    cfg = bootstrap_config(corpus, pool, tmp_path / "boot")
    table = run_bootstrap(cfg, rounds=2, use_ray=False, log=lambda _: None, quiet_tools=True)

    saved = json.loads((tmp_path / "boot" / "rounds.json").read_text())["rounds"]
    assert saved == table and [r["round"] for r in table] == [0, 1]
    assert (tmp_path / "boot" / "rounds.png").stat().st_size > 0
    base, pruned = table
    assert base["cutoff"] is None and base["kept"] == base["pool_rows"]
    assert base["ground_truth"]["recall"] is None and base["ground_truth"]["mismatched_in_pool"] > 0
    assert pruned["kept"] == math.ceil(TOP_FRACTION * pruned["pool_rows"])
    for row in table:
        assert Path(row["checkpoint"], "model.safetensors").is_file()
        assert 0 <= row["zero_shot"]["shapes/acc1"] <= 1

    # Every pool row is in the round's decisions; only the CLIP-score rule added rejections.
    decisions = pd.read_parquet(tmp_path / "boot" / "round-01" / "decisions.parquet")
    before = Pool.load(pool).decisions
    assert len(decisions) == len(before) and int(decisions["kept"].sum()) == pruned["kept"]
    assert set(decisions.loc[decisions["flag_clip_score"], "reason"]) == {"clip_score_not_in_top_fraction"}
    trained_on = [s.uid for shard in sorted((tmp_path / "boot" / "round-01" / "shards").glob("*.tar"))
                  for s in read_shard(str(shard))]
    assert trained_on == list(decisions.loc[decisions["kept"], "uid"])

    # The effect: what the scorer removes is mostly the generator's mismatched captions.
    truth = pruned["ground_truth"]
    base_rate = truth["mismatched_in_pool"] / (truth["mismatched_in_pool"] + truth["clean_in_pool"])
    assert truth["precision"] > 2 * base_rate, truth
    assert truth["recall"] >= 0.6 and truth["clean_kept"] >= 0.85, truth

    # Resume: an unfinished round 1 reuses its embeddings and trained model; finished rounds are skipped.
    (tmp_path / "boot" / "round-01" / "round.json").unlink()
    messages: list[str] = []
    again = run_bootstrap(cfg, rounds=2, use_ray=False, log=messages.append, quiet_tools=True)
    shards = len(Pool.load(pool).shards)
    assert "round 0: finished in an earlier run" in messages[0]
    assert any(f"{shards} shard(s) embedded ({shards} from an earlier run)" in m for m in messages)
    assert any(m.startswith("train: ") and m.endswith("finished in an earlier run") for m in messages)
    assert not any("vlm-train --config" in m for m in messages)
    assert again[1]["ground_truth"] == truth and again[1]["kept"] == pruned["kept"]


def test_an_empty_pool_or_an_unfinished_curation_is_refused_with_a_clear_message(tmp_path):
    with pytest.raises(BootstrapError, match=r"is not a finished curation run \(no manifest.json\)"):
        Pool.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    pd.DataFrame({"uid": ["a", "b"], "kept": [False, False], "reason": ["language", "image_side"]}).to_parquet(
        tmp_path / "decisions.parquet")
    with pytest.raises(BootstrapError, match=r"is empty: curation kept 0 of 2 rows read"):
        Pool.load(tmp_path)
