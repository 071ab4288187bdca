"""Specification of the suite layer: result files, the table, metrics for logs, suite YAML."""
import json

import numpy as np
import pytest
from PIL import Image

from vlmtrain.errors import ConfigError
from vlmtrain.eval.suite import format_table, load_suite_config, metrics_for_logging, write_results


def classification_record(name: str, classes: int) -> dict:
    rng = np.random.default_rng(classes)
    confusion = rng.integers(0, 5, (classes, classes)).tolist()
    return {"dataset": name, "model": "m", "task": "zeroshot_classification",
            "metrics": {"acc1": 0.5, "acc5": 0.75, "mean_per_class_recall": 0.4, "num_samples": 40},
            "skipped_images": 2, "skipped_keys": [{"key": "a", "reason": "r"}, {"key": "b", "reason": "r"}],
            "classnames": [f"class {i}" for i in range(classes)], "confusion_matrix": confusion}


RETRIEVAL = {"dataset": "coco", "model": "m", "task": "zeroshot_retrieval", "skipped_images": 0, "skipped_keys": [],
             "metrics": {"num_images": 5, "num_texts": 9,
                         **{f"{d}_retrieval_recall@{k}": 0.5 for d in ("image", "text") for k in (1, 5, 10)}}}


def test_results_json_and_one_confusion_png_per_classification_set(tmp_path):
    records = [classification_record("small", 4), classification_record("hundred", 100), RETRIEVAL]

    pictures = write_results(records, tmp_path / "out" / "results.json")

    assert json.loads((tmp_path / "out" / "results.json").read_text()) == records
    assert [p.name for p in pictures] == ["results_small_confusion.png", "results_hundred_confusion.png"]
    small, hundred = (Image.open(p) for p in pictures)
    assert hundred.width > small.width >= 400  # the picture grows with the classes so labels stay legible


def test_table_shows_every_set_and_the_skipped_images():
    table = format_table([classification_record("pets", 4), RETRIEVAL])

    lines = table.splitlines()
    assert lines[1].split() == ["pets", "40", "4", "0.5000", "0.7500", "0.4000", "2"]
    assert lines[-1].split() == ["coco", "5", "9", "0.500/0.500/0.500", "0.500/0.500/0.500", "0"]


def test_metrics_for_logging_are_flat_and_named_by_dataset():
    flat = metrics_for_logging([classification_record("pets", 4)])

    assert flat["eval/pets/acc1"] == 0.5 and flat["eval/pets/num_samples"] == 40.0


def test_shipped_demo_suite_parses():
    suite = load_suite_config("configs/eval/demo_suite.yaml")

    assert suite.checkpoint == "demo_out/run"
    assert [d.name or d.path for d in suite.datasets][-2:] == ["digits_bare_prompt", "demo_out/data/eval/retrieval"]


def test_suite_with_misspelled_key_names_it(tmp_path):
    (tmp_path / "s.yaml").write_text("checkpoint: x\ndatasets:\n  - path: a\n    templtes: t.json\n")

    with pytest.raises(ConfigError, match=r"unknown config key 'datasets\[0\].templtes' \(did you mean"):
        load_suite_config(tmp_path / "s.yaml")


def test_suite_needs_exactly_one_model_source(tmp_path):
    (tmp_path / "s.yaml").write_text("checkpoint: x\nmodel: ViT-B-32\ndatasets:\n  - path: a\n")

    with pytest.raises(ConfigError, match="exactly one of 'checkpoint'"):
        load_suite_config(tmp_path / "s.yaml")
