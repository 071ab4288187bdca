"""The whole curation pipeline on a real local Ray: bad inputs, quality on a generated pool, resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import webdataset as wds

from data_pipeline.config import load_curate_config
from data_pipeline.pipeline import run
from tests.conftest import REPO, cli_env, failure_text, run_tool
from tests.pipeline.conftest import bad_samples

pytestmark = pytest.mark.e2e
DEMO = REPO / "configs" / "curate" / "demo.yaml"
JUNK = ("tiny_image", "empty_caption", "garbage_caption", "non_english_caption", "corrupt_image")


def demo_overrides(pool: Path, out: Path) -> list[str]:
    return [f"output_dir={out}", f"sources=[{{format: webdataset, path: '{pool}'}}]",
            "output.samples_per_shard=400", "progress=false"]


@pytest.fixture(scope="session")
def curated_pool(generated_pool, tmp_path_factory, local_ray) -> Path:
    out = tmp_path_factory.mktemp("curated") / "out"
    run(load_curate_config(DEMO, demo_overrides(generated_pool, out)), ray_address=local_ray)
    return out


def test_bad_inputs_of_every_kind_get_specific_reasons_and_never_stop_the_run(bad_input_dir, tmp_path, local_ray):
    out = tmp_path / "out"
    cfg = load_curate_config(DEMO, [
        f"output_dir={out}", "progress=false", "heuristics.url_blocklist=[blocked.example.org]",
        "sources=[{format: webdataset, path: '%s'}, {format: parquet, path: '%s'}, {format: jsonl, path: '%s'}]"
        % (bad_input_dir / "wds", bad_input_dir / "parquet", bad_input_dir / "jsonl/pairs.jsonl")])
    manifest = run(cfg, ray_address=local_ray)

    decisions = pd.read_parquet(out / "decisions.parquet")
    rows = manifest["funnel"]["rows"]
    assert rows["kept"] + int((~decisions["kept"]).sum()) == rows["read"] == len(decisions)
    by_key = decisions.groupby("key")["reason"].agg(list)
    for sample, want in bad_samples():
        reasons = by_key[sample["__key__"]]
        if want is None:
            assert pd.isna(reasons[0]), sample["__key__"]
        elif want.startswith("note:"):
            row = decisions[decisions["key"] == sample["__key__"]].iloc[0]
            assert row["kept"] and want[5:] in row["notes"]
        else:
            assert want in reasons, (sample["__key__"], reasons)
    assert "truncated_tar" in set(decisions["reason"])
    assert by_key["p1"] == ["missing_image"] and by_key["p2"] == ["undecodable_image"]
    assert by_key["line-2"] == ["invalid_jsonl_line"] and by_key["line-1"] == ["image_file_not_found"]
    assert by_key["line-0"] == ["url_blocklist"]

    # What was kept is a valid webdataset: an image and a caption per sample, repaired images as RGB.
    samples = list(wds.WebDataset([str(p) for p in sorted((out / "shards").glob("*.tar"))], shardshuffle=False)
                   .decode("pil"))
    assert len(samples) == rows["kept"]
    for sample in samples:
        image = sample.get("jpg") or sample.get("png") or sample.get("webp")
        assert image.mode == "RGB" and sample["txt"]


def test_heuristics_and_dedup_catch_the_generators_injected_noise(curated_pool, generated_pool):
    decisions = pd.read_parquet(curated_pool / "decisions.parquet")
    truth = pd.read_parquet(generated_pool / "index.parquet")
    table = decisions.merge(truth[["key", "noise", "duplicate_of"]].rename(columns={"duplicate_of": "original"}),
                            on="key", validate="one_to_one")
    assert len(table) == len(truth)
    manifest = json.loads((curated_pool / "manifest.json").read_text())
    assert manifest["funnel"]["rows"]["kept"] + int((~decisions["kept"]).sum()) == len(decisions)

    dedup_reasons = {"near_duplicate", "exact_duplicate_image", "exact_duplicate_pair"}
    rejected_before_dedup = table["reason"].notna() & ~table["reason"].isin(dedup_reasons)
    junk = table["noise"].isin(JUNK)
    clean = table["noise"] == "clean"
    junk_rate = rejected_before_dedup[junk].mean()
    clean_rate = rejected_before_dedup[clean].mean()

    # A near duplicate is caught when dedup removed it or its original as a duplicate of the other
    # (of any copy of the same original: the largest copy is the one kept).
    group = table["original"].fillna(table["key"])
    group_of_uid = dict(zip(table["uid"], group))
    removed_within_group = table["duplicate_of"].map(group_of_uid) == group
    near = table["noise"] == "near_duplicate"
    caught = removed_within_group[near] | table.loc[near, "uid"].isin(set(table["duplicate_of"].dropna()))
    reached_dedup = ~rejected_before_dedup[near] & table.loc[near, "original"].map(
        dict(zip(table["key"], ~rejected_before_dedup))).to_numpy()
    meta = {}
    for shard in sorted(generated_pool.glob("*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            meta[sample["__key__"]] = json.loads(sample["json"])["dup_transform"]
    transform = table.loc[near, "key"].map(meta)
    wrongly_removed = table["reason"].isin(dedup_reasons) & ~removed_within_group
    print(f"\nheuristics+validation reject {junk_rate:.1%} of {junk.sum()} injected junk, "
          f"{clean_rate:.2%} of {clean.sum()} clean pairs")
    print(f"near-dup removal catches {caught.mean():.1%} of {near.sum()} injected near duplicates ("
          + ", ".join(f"{t} {caught[transform == t].mean():.1%}" for t in ("jpeg_quality", "resize", "crop"))
          + f"); {caught[reached_dedup].mean():.1%} of the {reached_dedup.sum()} whose both copies passed the heuristics")
    print(f"clean pairs removed as duplicates of an unrelated pair: {wrongly_removed[clean].mean():.2%}")
    assert junk_rate >= 0.95
    assert clean_rate <= 0.02
    assert caught.mean() >= 0.90
    assert wrongly_removed[clean].mean() <= 0.01


def test_a_killed_run_resumes_to_byte_identical_shards_and_decisions(curated_pool, generated_pool, tmp_path,
                                                                     local_ray):
    out = tmp_path / "out"
    command = [str(Path(sys.executable).parent / "vlm-curate"), "run", str(DEMO),
               *demo_overrides(generated_pool, out), "--ray-address", local_ray]
    first = subprocess.Popen(command, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    parts = out / ".work" / "parts"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(parts.glob("*.parquet"))) < 2:
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done_before = len(list(parts.glob("*.parquet")))
    assert 2 <= done_before < 6 and not (out / "manifest.json").exists()

    second = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, failure_text(second)
    assert f"({done_before} from an earlier run)" in second.stdout
    assert (out / "decisions.parquet").read_bytes() == (curated_pool / "decisions.parquet").read_bytes()
    shards = sorted(p.name for p in (curated_pool / "shards").glob("*.tar"))
    assert shards and shards == sorted(p.name for p in (out / "shards").glob("*.tar"))
    for name in shards:
        assert (out / "shards" / name).read_bytes() == (curated_pool / "shards" / name).read_bytes()
    assert "funnel: read 1500" in second.stdout


def test_report_writes_the_funnel_histograms_and_rejected_examples(curated_pool):
    result = run_tool("vlm-curate", "report", str(curated_pool))
    assert result.returncode == 0, result.stderr
    page = (curated_pool / "report" / "index.html").read_text()
    for name in ("funnel.png", "histograms.png"):
        assert (curated_pool / "report" / name).stat().st_size > 1000 and name in page
    assert "near_duplicate" in page and "language" in page and page.count("<figure>") >= 10


def test_cli_rejects_a_misspelled_key_before_starting_ray(tmp_path):
    result = run_tool("vlm-curate", "run", str(DEMO), "heuristics.min_side=3")
    assert result.returncode == 2 and "heuristics.min_side" in result.stderr and "did you mean" in result.stderr
