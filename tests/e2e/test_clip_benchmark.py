"""CLIP_benchmark itself, on the generated eval sets and an exported open_clip folder, gives vlm-eval's numbers.

CLIP_benchmark 1.6.2 lives in build/clip_benchmark (``make clip-benchmark``): the package and a numpy it
accepts (< 2.4), put in front of the venv's torch and open_clip with PYTHONPATH, so no second torch.
"""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_env, failure_text, run_tool

pytestmark = pytest.mark.e2e
CLIP_BENCHMARK = REPO / "build" / "clip_benchmark"
CLASSIFICATION_METRICS = ("acc1", "acc5", "mean_per_class_recall")
RECALL_K = (1, 5, 10)
# CLIP_benchmark reports recalls as float32 (0.0033333334 for 1/300): far below one sample's 1/600.
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def openclip_dir(small_corpus, tmp_path_factory):
    """A briefly trained tiny CLIP (so its predictions differ between images), exported for open_clip."""
    run_dir = tmp_path_factory.mktemp("run")
    train = run_tool("vlm-train", "--config", "configs/train/demo.yaml", "--nproc-per-node", "1",
                     f"data.train_shards={small_corpus / 'train'}", f"output_dir={run_dir}", "steps=40",
                     "log_every=20", "data.batch_size=32", "optim.warmup_steps=2", "progress=false",
                     "metrics.tensorboard=false")
    assert train.returncode == 0, failure_text(train)
    out = run_dir / "openclip"
    export = run_tool("tools/openclip_convert.py", "export", str(run_dir), str(out))
    assert export.returncode == 0, failure_text(export)
    return out


def clip_benchmark(dataset_root, model_dir, output, task: str) -> dict:
    """``clip_benchmark eval`` on one wds set, fp32 on CPU, nothing downloaded; its result record.
    (Its ``--task auto`` knows retrieval only by its own dataset names: the task is given.)"""
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CLIP_BENCHMARK), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "clip_benchmark.cli", "eval", "--dataset", f"wds/{dataset_root.name}",
               "--dataset_root", str(dataset_root), "--task", task, "--model", f"local-dir:{model_dir}", "--pretrained", "",
               "--no_amp", "--num_workers", "0", "--batch_size", "64", "--recall_k", *map(str, RECALL_K),
               "--output", str(output)]
    result = subprocess.run(command, cwd=output.parent, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, failure_text(result)
    return json.loads(output.read_text())


def test_clip_benchmark_reads_the_generated_sets_and_agrees_with_vlm_eval(small_corpus, openclip_dir, tmp_path):
    if not (CLIP_BENCHMARK / "clip_benchmark").is_dir():
        pytest.skip("CLIP_benchmark is not installed: run `make clip-benchmark`")
    ours_file = tmp_path / "vlm_eval.json"
    ours = run_tool("vlm-eval", "zeroshot", "--model", f"local-dir:{openclip_dir}", "--data",
                    str(small_corpus / "eval"), "--out", str(ours_file), "--batch-size", "64", "--no-progress")
    assert ours.returncode == 0, failure_text(ours)
    records = {r["dataset"]: r["metrics"] for r in json.loads(ours_file.read_text())}

    for name in ("shapes", "digits"):
        theirs = clip_benchmark(small_corpus / "eval" / name, openclip_dir, tmp_path / f"{name}.json",
                                "zeroshot_classification")
        assert theirs["task"] == "zeroshot_classification"
        for metric in CLASSIFICATION_METRICS:
            assert theirs["metrics"][metric] == pytest.approx(records[name][metric], abs=TOLERANCE), (name, metric)

    theirs = clip_benchmark(small_corpus / "eval" / "retrieval", openclip_dir, tmp_path / "retrieval.json",
                            "zeroshot_retrieval")
    assert theirs["task"] == "zeroshot_retrieval"
    for k in RECALL_K:
        for metric in (f"image_retrieval_recall@{k}", f"text_retrieval_recall@{k}"):
            assert theirs["metrics"][metric] == pytest.approx(records["retrieval"][metric], abs=TOLERANCE), metric
