"""Specification of `vlm-curate bootstrap`: a scorer trained on the pool itself finds its mismatched captions.

Round k ≥ 1 is the pool's own `vlm-curate run` with round k−1's model as the scorer and the CLIP-score
stage on. The end-to-end numbers on the full 12k demo pool (≥ 80% of mismatched captions removed, ≥ 90% of clean
pairs kept, higher zero-shot top-1 after pruning) are tools/bench_bootstrap.py's; here a 1,200-pair pool
and a 150-step scorer must already show the effect.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from data_pipeline.bootstrap import BootstrapError, Pool, run_bootstrap
from data_pipeline.config import load_bootstrap_config, load_curate_config
from data_pipeline.embed.jobs import read_shard
from data_pipeline.pipeline import run as curate
from tests.conftest import REPO, generate_corpus
from vlmtrain.configlib import to_dict

pytestmark = pytest.mark.e2e
TOP_FRACTION = 0.75
# The round's shards are as large as samples_per_shard allows while every vlm-train reader slot (1 here)
# gets one: 1000 is more than round 1 keeps, so its write step is redone with the size of what it kept.
SAMPLES_PER_SHARD = 1000
TRAIN_OVERRIDES = ["steps=150", "data.batch_size=64", "zero_stage=0", "optim.warmup_steps=20", "progress=false",
                   "metrics.tensorboard=false"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return generate_corpus(tmp_path_factory.mktemp("bootstrap_corpus"), seed=5, num_train=1200,
                           samples_per_shard=300, eval_per_class=2)


def pool_overrides(corpus: Path, out: Path) -> list[str]:
    return [f"output_dir={out}", f"sources=[{{format: webdataset, path: '{corpus / 'train'}'}}]",
            "output.samples_per_shard=250", "progress=false"]


@pytest.fixture(scope="module")
def pool(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bootstrap_pool") / "curated"
    curate(load_curate_config(REPO / "configs" / "curate" / "demo.yaml", pool_overrides(corpus, out)), use_ray=False,
           log=lambda _: None)
    return out


def bootstrap_config(corpus: Path, pool: Path, out: Path, overrides: list[str] = ()):
    return load_bootstrap_config(REPO / "configs" / "curate" / "bootstrap_demo.yaml", [
        f"pool={pool}", f"output_dir={out}", "nproc=1", f"eval_sets=[{corpus / 'eval' / 'shapes'}]",
        f"ground_truth={corpus / 'train' / 'index.parquet'}", f"clip_score.top_fraction={TOP_FRACTION}",
        f"train_overrides={json.dumps(TRAIN_OVERRIDES)}", "embed.progress=false",
        f"samples_per_shard={SAMPLES_PER_SHARD}", *overrides])


@pytest.fixture(scope="module")
def bootstrapped(corpus, pool, tmp_path_factory):
    """Two rounds trained from scratch: (config, rounds table, log). The later tests reuse its runs."""
    cfg, messages = bootstrap_config(corpus, pool, tmp_path_factory.mktemp("bootstrapped") / "boot"), []
    return cfg, run_bootstrap(cfg, rounds=2, use_ray=False, log=messages.append, quiet_tools=True), messages


def test_a_scorer_bootstrapped_from_the_pool_prunes_mostly_mismatched_captions_and_a_rerun_resumes(
        corpus, pool, bootstrapped):
    cfg, table, _ = bootstrapped
    boot = Path(cfg.output_dir)
    saved = json.loads((boot / "rounds.json").read_text())["rounds"]
    assert saved == table and [r["round"] for r in table] == [0, 1]
    assert (boot / "rounds.png").stat().st_size > 0
    base, pruned = table
    assert base["cutoff"] is None and base["kept"] == base["pool_rows"]
    assert base["ground_truth"]["recall"] is None and base["ground_truth"]["mismatched_in_pool"] > 0
    assert pruned["kept"] == math.ceil(TOP_FRACTION * pruned["pool_rows"])
    for row in table:
        assert Path(row["checkpoint"], "model.safetensors").is_file()
        assert 0 <= row["zero_shot"]["shapes/acc1"] <= 1

    # Every pool row is in the round's decisions; only the CLIP-score rule added rejections.
    decisions = pd.read_parquet(boot / "round-01" / "curated" / "decisions.parquet")
    before = Pool.load(pool).decisions
    assert len(decisions) == len(before) and int(decisions["kept"].sum()) == pruned["kept"]
    assert set(decisions.loc[decisions["flag_clip_score"], "reason"]) == {"clip_score_not_in_top_fraction"}
    trained_on = [s.uid for shard in sorted((boot / "round-01" / "curated" / "shards").glob("*.tar"))
                  for s in read_shard(str(shard))]
    assert trained_on == list(decisions.loc[decisions["kept"], "uid"])

    # The effect: what the scorer removes is mostly the generator's mismatched captions.
    truth = pruned["ground_truth"]
    base_rate = truth["mismatched_in_pool"] / (truth["mismatched_in_pool"] + truth["clean_in_pool"])
    assert truth["precision"] > 2 * base_rate, truth
    assert truth["recall"] >= 0.6 and truth["clean_kept"] >= 0.85, truth

    # Resume: an unfinished round 1 reuses its embeddings and trained model; finished rounds are skipped.
    (boot / "round-01" / "round.json").unlink()
    messages: list[str] = []
    again = run_bootstrap(cfg, rounds=2, use_ray=False, log=messages.append, quiet_tools=True)
    parts = len(list((corpus / "train").glob("*.tar")))
    assert "round 0: finished in an earlier run" in messages[0]
    assert any(f"{parts} job(s) embedded ({parts} from an earlier run)" in m for m in messages)
    assert any(m.startswith("train: ") and m.endswith("finished in an earlier run") for m in messages)
    assert not any("vlm-train --config" in m for m in messages)
    assert again[1]["ground_truth"] == truth and again[1]["kept"] == pruned["kept"]


def test_round_1_is_the_pools_own_curation_run_again_with_round_0_as_scorer_and_clip_score_on(
        corpus, pool, bootstrapped):
    cfg, table, messages = bootstrapped
    boot = Path(cfg.output_dir)
    curated = boot / "round-01" / "curated"
    manifest = json.loads((curated / "manifest.json").read_text())
    # What a user would type: the pool's command line, the scorer and the rule, shards that fit the one reader slot.
    typed = load_curate_config(REPO / "configs" / "curate" / "demo.yaml", [
        *pool_overrides(corpus, curated), f"embedding.model.checkpoint={boot / 'round-00' / 'run'}",
        "embedding.clip_score.enabled=true", "embedding.clip_score.rule=top_fraction",
        f"embedding.clip_score.top_fraction={TOP_FRACTION}", "embedding.embed.progress=false",
        f"output.samples_per_shard={table[1]['kept']}"])
    assert manifest["config"] == json.loads(json.dumps(to_dict(typed)))
    assert manifest["inputs"] == json.loads((pool / "manifest.json").read_text())["inputs"]
    assert manifest["funnel"]["rows"]["kept"] == table[1]["kept"] and len(manifest["shards"]) == 1
    # It started from the pool's scored parts, and round 1 trained on its shards.
    parts = len(list((corpus / "train").glob("*.tar")))
    assert f"score: {parts} part(s) scored ({parts} from an earlier run)" in messages
    trained = json.loads((boot / "round-01" / "run" / "config.json").read_text())
    assert trained["data"]["train_shards"] == str(curated / "shards")


def test_a_finished_run_given_as_round0_run_is_round_0_and_its_scorer_without_training_again(
        corpus, pool, bootstrapped, tmp_path):
    cfg, table, _ = bootstrapped
    boot, reused, out = Path(cfg.output_dir), Path(cfg.output_dir) / "round-00" / "run", tmp_path / "reuse"
    # Round 1's training is not under test here: a copy of the first bootstrap's finished run stands in for it.
    shutil.copytree(boot / "round-01" / "run", out / "round-01" / "run")
    messages: list[str] = []
    again = run_bootstrap(bootstrap_config(corpus, pool, out, [f"round0_run={reused}"]), rounds=2, use_ray=False,
                          log=messages.append, quiet_tools=True)

    assert not any("vlm-train --config" in m for m in messages) and not (out / "round-00" / "run").exists()
    assert again[0]["reused_run"] == str(reused) and again[0]["checkpoint"] == str(reused / "final")
    assert again[0]["train_summary"] == table[0]["train_summary"]
    assert again[0]["zero_shot"] == table[0]["zero_shot"]  # evaluated again: the same model gives the same numbers
    # Round 1 scored the pool with the reused run: the same scores and decisions as the first bootstrap's round 1.
    assert again[1]["scorer"] == str(reused)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "round-01" / "curated" / "decisions.parquet"),
                                  pd.read_parquet(boot / "round-01" / "curated" / "decisions.parquet"))
    assert again[1]["ground_truth"] == table[1]["ground_truth"]


def test_a_round0_run_that_did_not_train_as_round_0_would_is_refused_naming_what_differs(
        corpus, pool, bootstrapped, tmp_path):
    cfg, _, _ = bootstrapped
    boot = Path(cfg.output_dir)

    def refused(run: Path, *overrides: str) -> str:
        with pytest.raises(BootstrapError) as refusal:
            run_bootstrap(bootstrap_config(corpus, pool, tmp_path / "out", [f"round0_run={run}", *overrides]),
                          rounds=1, use_ray=False, log=lambda _: None, quiet_tools=True)
        return str(refusal.value)

    other_shards = refused(boot / "round-01" / "run")  # trained on round 1's pruned pool
    round1_shards = boot / "round-01" / "curated" / "shards"
    assert f"data.train_shards ('{round1_shards}' there, '{Path(pool) / 'shards'}' here)" in other_shards
    fewer_steps = json.dumps(["steps=100", *TRAIN_OVERRIDES[1:]])
    assert "differing: steps (150 there, 100 here)" in refused(boot / "round-00" / "run",
                                                               f"train_overrides={fewer_steps}")
    assert "nproc (1 ranks there, 2 here)" in refused(boot / "round-00" / "run", "nproc=2")
    assert "is not a finished vlm-train run" in refused(boot / "round-00")
    assert not (tmp_path / "out" / "round-00").exists()

    # A round 0 finished with a run that was retrained since: the rounds built on it are stale.
    run = tmp_path / "run"
    shutil.copytree(boot / "round-00" / "run", run)
    config = bootstrap_config(corpus, pool, tmp_path / "stale", [f"round0_run={run}", "eval_sets=[]"])
    run_bootstrap(config, rounds=1, use_ray=False, log=lambda _: None, quiet_tools=True)
    summary = json.loads((run / "train_summary.json").read_text())
    (run / "train_summary.json").write_text(json.dumps({**summary, "final_loss": summary["final_loss"] + 1}))
    with pytest.raises(BootstrapError, match=r"finished with another model than round0_run .*\(retrained since\?\)"):
        run_bootstrap(config, rounds=1, use_ray=False, log=lambda _: None, quiet_tools=True)


def test_an_empty_pool_or_an_unfinished_curation_is_refused_with_a_clear_message(tmp_path):
    with pytest.raises(BootstrapError, match=r"is not a finished curation run \(no manifest.json\)"):
        Pool.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    pd.DataFrame({"uid": ["a", "b"], "kept": [False, False], "reason": ["language", "image_side"]}).to_parquet(
        tmp_path / "decisions.parquet")
    with pytest.raises(BootstrapError, match=r"is empty: curation kept 0 of 2 rows read"):
        Pool.load(tmp_path)
