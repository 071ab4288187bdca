"""The stage registry drives the run: a new stage is its module plus one registry line.

The two stages of tests/pipeline/toy_stages.py (a row stage and a global one) are added the way a
developer adds a stage, one line each in ``registry.STAGES`` (here, before anything reads it), and
then a real ``vlm-curate`` runs in a fresh process: their config sections load from the YAML
overrides, they run in order, and their reasons show in the funnel, the reasons table, the report
and ``--help``.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd

from tests.conftest import REPO

DEMO = REPO / "configs" / "curate" / "demo.yaml"
WITH_TOY_STAGES = """
import sys
from data_pipeline import registry
from data_pipeline.registry import GLOBAL, ROW, Stage
from tests.pipeline.toy_stages import CaptionRepeatsConfig, NoCoffeeConfig, caption_repeats, no_coffee

head, dedup, embedding = registry.STAGES[:2], registry.STAGES[2:4], registry.STAGES[4:]
registry.STAGES = (
    *head,
    Stage("no_coffee", "no_coffee", NoCoffeeConfig, ("mentions_coffee",), "toy row stage", ROW, no_coffee),
    *dedup,
    Stage("caption_repeats", "caption_repeats", CaptionRepeatsConfig, ("repeated_caption",), "toy global stage",
          GLOBAL, caption_repeats),
    *embedding)

from data_pipeline.cli import build_parser, main
print(build_parser().format_help())
for command in sys.argv[1:]:
    assert main(command.split("\\t")) == 0
"""


def test_two_stages_added_by_their_module_and_one_line_each_run_and_report_their_reasons(bad_input_dir, tmp_path):
    out = tmp_path / "out"
    run = ["run", str(DEMO), f"output_dir={out}", "progress=false", "caption_repeats.max_repeats=1",
           f"sources=[{{format: webdataset, path: '{bad_input_dir / 'wds'}'}}]", "--no-ray"]
    result = subprocess.run([sys.executable, "-c", WITH_TOY_STAGES, "\t".join(run), f"report\t{out}"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    help_text, _, printed = result.stdout.partition("funnel: ")
    assert "no_coffee       [no_coffee] toy row stage" in help_text and "mentions_coffee" in help_text
    assert "caption_repeats [caption_repeats] toy global stage" in help_text and "repeated_caption" in help_text

    manifest = json.loads((out / "manifest.json").read_text())
    rows, rejected = manifest["funnel"]["rows"], manifest["funnel"]["rejected_by_reason"]
    assert list(rows) == ["read", "validate", "heuristics", "no_coffee", "exact_dedup", "near_dedup",
                          "caption_repeats", "kept"]
    assert rows["heuristics"] - rows["no_coffee"] == rejected["mentions_coffee"] == 1
    assert rows["near_dedup"] - rows["caption_repeats"] == rejected["repeated_caption"] > 0
    assert manifest["config"]["caption_repeats"] == {"max_repeats": 1}
    assert f"near_dedup {rows['near_dedup']} → caption_repeats {rows['caption_repeats']}" in printed
    assert f"  repeated_caption{rejected['repeated_caption']:>15}" in printed.splitlines()  # the reasons table

    decisions = pd.read_parquet(out / "decisions.parquet").set_index("uid")
    assert decisions.loc[decisions["key"] == "cmyk", "reason"].item() == "mentions_coffee"  # "a cup of hot coffee..."
    repeated = decisions[decisions["reason"] == "repeated_caption"]
    first = repeated["caption_first_seen"].to_numpy()
    assert decisions.loc[first, "kept"].all() and (first != repeated.index).all()
    captions = pd.concat(pd.read_parquet(part, columns=["uid", "caption"])
                         for part in (out / ".work" / "parts").glob("*.parquet")).set_index("uid")["caption"]
    assert (captions[first].to_numpy() == captions[repeated.index].to_numpy()).all()
    page = (out / "report" / "index.html").read_text()
    assert f"<h3>repeated_caption ({rejected['repeated_caption']})</h3>" in page
