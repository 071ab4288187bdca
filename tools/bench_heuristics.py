#!/usr/bin/env python
"""Precision and recall of every heuristic rule against a generated pool's labels.

Runs the decode and heuristics stages (no Ray) over the shards of a pool made by
tools/make_demo_data.py, with a curation config's heuristics (default: configs/curate/demo.yaml), and
compares each rule's own flag (not only the first reason), on the rows that decoded, with the
generator's noise label it is meant to catch; precision counts other junk a rule flags as a miss
(a garbage caption flagged by the language rule), so "good pairs flagged" is shown too. Also prints the language rule's losses: the share of clean pairs, and of all pairs with an
English caption, that it rejects.

    python tools/make_demo_data.py --out build/demo --seed 0
    python tools/bench_heuristics.py build/demo/train
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_pipeline.config import SourceConfig, load_curate_config  # noqa: E402
from data_pipeline.sources import list_parts, read_part  # noqa: E402
from data_pipeline.stages.decode import DecodeConfig, validate  # noqa: E402
from data_pipeline.stages.heuristics import RULES, Heuristics  # noqa: E402

# The generator's noise label(s) each rule is meant to catch (rules without one: none in the pool).
TARGETS = {
    "caption_chars": {"empty_caption"},
    "caption_words": {"empty_caption"},
    "image_side": {"tiny_image"},
    "language": {"non_english_caption"},
    "repeated_words": {"garbage_caption"},
    "symbols": {"garbage_caption"},
}
ENGLISH_CAPTIONS = {"clean", "mismatched_caption", "near_duplicate", "tiny_image", "corrupt_image"}
# Pairs no heuristic should reject (mismatched captions and near duplicates are later stages' work).
GOOD = {"clean", "mismatched_caption", "near_duplicate"}


def scored_pool(pool: Path, config: Path) -> pd.DataFrame:
    cfg = load_curate_config(config, ["output_dir=unused", f"sources=[{{path: '{pool}'}}]"])
    source = SourceConfig(format="webdataset", path=str(pool))
    heuristics = Heuristics(cfg.heuristics)
    rows = pd.concat([heuristics(validate(read_part(part, source), DecodeConfig())) for part in list_parts([source])],
                     ignore_index=True)
    labels = pd.read_parquet(pool / "index.parquet").set_index("key")["noise"]
    return rows.assign(noise=rows["key"].map(labels))


def rule_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per rule, over the rows that passed decoding (the rows the rules judge): flagged rows, precision
    and recall against the rule's target labels, and good pairs flagged."""
    rows = rows[rows["reason_validate"].isna()]
    good = rows["noise"].isin(GOOD)
    table = []
    for rule in RULES:
        flagged = rows[f"flag_{rule}"].astype(bool)
        target = rows["noise"].isin(TARGETS.get(rule, set()))
        hits = int((flagged & target).sum())
        table.append({"rule": rule, "targets": ",".join(sorted(TARGETS.get(rule, ()))) or "-",
                      "flagged": int(flagged.sum()), "target_rows": int(target.sum()),
                      "precision": hits / flagged.sum() if flagged.any() else float("nan"),
                      "recall": hits / target.sum() if target.any() else float("nan"),
                      "good_pairs_flagged": int((flagged & good).sum())})
    return pd.DataFrame(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pool", type=Path, help="a generated pool's train/ folder (shards + index.parquet)")
    parser.add_argument("--config", type=Path, default=Path("configs/curate/demo.yaml"))
    args = parser.parse_args()
    rows = scored_pool(args.pool, args.config)
    print(f"pool: {len(rows)} rows; labels: " + ", ".join(f"{k} {v}" for k, v in rows["noise"].value_counts().items()))
    print(rule_table(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    language = rows["flag_language"].astype(bool)
    for name, mask in (("clean pairs", rows["noise"] == "clean"),
                       ("pairs with an English caption", rows["noise"].isin(ENGLISH_CAPTIONS)),
                       ("non-English captions", rows["noise"] == "non_english_caption")):
        print(f"language rule rejects {int(language[mask].sum())} of {int(mask.sum())} {name} "
              f"({language[mask].mean():.2%})")


if __name__ == "__main__":
    main()
