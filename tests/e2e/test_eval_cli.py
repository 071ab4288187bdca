"""The evaluation command lines as a user runs them: vlm-eval zeroshot / retrieval and
tools/zeroshot_eval.py on the generated demo eval sets, with an exported tiny model."""
import json
import shutil

import pytest
import torch
import yaml

from tests.conftest import failure_text, run_tool
from tests.helpers import build_clip as build_model, clip_config
from vlmtrain.checkpoint import write_export

pytestmark = pytest.mark.e2e
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CFG = clip_config(embed_dim=32, vision={"width": 32}, text={"context_length": 24, "width": 32})


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("run") / "final"
    write_export(build_model(CFG).state_dict(), CFG, out, {})
    return out


def test_zeroshot_writes_json_table_and_confusion_pngs(small_corpus, export, tmp_path):
    out = tmp_path / "results.json"
    result = run_tool("vlm-eval", "zeroshot", "--checkpoint", str(export), "--data", str(small_corpus / "eval"),
                      "--out", str(out), "--batch-size", "64", "--no-progress")

    assert result.returncode == 0, failure_text(result)
    records = {r["dataset"]: r for r in json.loads(out.read_text())}
    assert set(records) == {"shapes", "digits", "retrieval"}
    for name in ("shapes", "digits"):
        assert {"acc1", "acc5", "mean_per_class_recall", "num_samples"} <= set(records[name]["metrics"])
        assert records[name]["skipped_images"] == 0
        png = tmp_path / f"results_{name}_confusion.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert str(png) in result.stdout
    assert "text_retrieval_recall@10" in records["retrieval"]["metrics"]
    assert not (tmp_path / "results_retrieval_confusion.png").exists()
    for name in records:
        assert name in result.stdout


def test_retrieval_command_evaluates_only_retrieval_sets(small_corpus, export, tmp_path):
    out = tmp_path / "retrieval.json"
    result = run_tool("vlm-eval", "retrieval", "--checkpoint", str(export), "--data", str(small_corpus / "eval"),
                      "--out", str(out), "--no-progress")

    assert result.returncode == 0, failure_text(result)
    assert [r["dataset"] for r in json.loads(out.read_text())] == ["retrieval"]


def test_suite_tool_evaluates_every_listed_set(small_corpus, export, tmp_path):
    suite = yaml.safe_load(open("configs/eval/demo_suite.yaml"))
    for entry in suite["datasets"]:  # the shipped suite, pointed at this test's corpus
        entry["path"] = entry["path"].replace("demo_out/data", str(small_corpus))
    suite.update(checkpoint=str(export), out=str(tmp_path / "suite.json"))
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))

    result = run_tool("tools/zeroshot_eval.py", str(tmp_path / "suite.yaml"), "batch_size=32", "--no-progress")

    assert result.returncode == 0, failure_text(result)
    records = {r["dataset"]: r for r in json.loads((tmp_path / "suite.json").read_text())}
    assert list(records) == ["shapes", "digits", "digits_bare_prompt", "retrieval"]
    assert records["digits_bare_prompt"]["metrics"]["num_samples"] == records["digits"]["metrics"]["num_samples"]
    assert records["digits_bare_prompt"]["metrics"] != records["digits"]["metrics"]  # other prompts, other numbers


def test_missing_class_names_is_one_error_line_and_exit_2(small_corpus, export, tmp_path):
    broken = tmp_path / "digits"
    shutil.copytree(small_corpus / "eval" / "digits", broken)
    (broken / "zeroshot_classification_templates.txt").unlink()
    result = run_tool("vlm-eval", "zeroshot", "--checkpoint", str(export), "--data", str(broken),
                      "--classnames", "imagenet")

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"vlm-eval: error: no prompt templates for dataset 'digits': expected "
        f"{broken}/zeroshot_classification_templates.txt (one per line) or .json, or give them "
        f"(--templates FILE or a built-in name: imagenet, imagenet_simple)"]


def test_unreadable_checkpoint_is_one_error_line_and_exit_2(small_corpus, tmp_path):
    result = run_tool("vlm-eval", "zeroshot", "--checkpoint", str(tmp_path), "--data", str(small_corpus / "eval"))

    assert result.returncode == 2
    assert result.stderr.startswith(f"vlm-eval: error: no model in {tmp_path}: expected an export")
