"""The stage registry drives the run: a new row-wise stage is its function plus one registry entry."""
from __future__ import annotations

import pandas as pd

from data_pipeline import registry
from data_pipeline.cli import stage_table
from data_pipeline.config import load_curate_config
from data_pipeline.pipeline import run
from data_pipeline.registry import STAGES, Stage
from tests.conftest import REPO

DEMO = REPO / "configs" / "curate" / "demo.yaml"


def no_coffee(batch: pd.DataFrame) -> pd.DataFrame:
    """A toy row-wise stage: rejects captions that mention coffee."""
    out = batch.copy()
    mentions = out["caption"].fillna("").str.contains("coffee")
    out["reason_toy_filter"] = mentions.map({True: "toy_coffee", False: None})
    return out


def test_a_registered_row_stage_runs_records_its_reason_and_joins_the_funnel(bad_input_dir, tmp_path, monkeypatch):
    toy = Stage("toy_filter", "toy", ("toy_coffee",), "a stage this test adds", build=lambda cfg: no_coffee)
    monkeypatch.setattr(registry, "STAGES", (*STAGES[:2], toy, *STAGES[2:]))  # the one line a new stage adds
    out = tmp_path / "out"
    cfg = load_curate_config(DEMO, [f"output_dir={out}", "progress=false",
                                    f"sources=[{{format: webdataset, path: '{bad_input_dir / 'wds'}'}}]"])
    manifest = run(cfg, use_ray=False, log=lambda line: None)

    decisions = pd.read_parquet(out / "decisions.parquet").set_index("key")
    assert decisions.loc["cmyk", "reason"] == "toy_coffee"  # "a cup of hot coffee next to an open book"
    rows = manifest["funnel"]["rows"]
    assert list(rows)[:5] == ["read", "validate", "heuristics", "toy_filter", "exact_dedup"]
    assert rows["heuristics"] - rows["toy_filter"] == manifest["funnel"]["rejected_by_reason"]["toy_coffee"] == 1
    assert "toy_filter" in stage_table() and "toy_coffee" in stage_table()
