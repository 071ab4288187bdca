"""Reading weights from a checkpoint directory never runs code stored in it.

Each tool that loads a model from a vlm-train run (vlm-eval, vlm-curate embed, the bootstrap's scorer)
is pointed at a run whose DeepSpeed file carries real weights plus a pickle that would create a marker
file. The tool must refuse it with one error line naming --trust-checkpoint, and the marker must not
appear.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, run_tool
from tests.helpers import curate_config_args, webdataset_source, write_hostile_run

pytestmark = pytest.mark.e2e


def assert_refused_without_running_code(result, marker: Path, tool: str) -> None:
    assert not marker.exists(), "the checkpoint's pickle ran"
    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith(f"{tool}: error: ")]
    assert len(error) == 1, result.stderr
    assert "--trust-checkpoint" in error[0] and "mp_rank_00_model_states.pt" in error[0]


def test_vlm_eval_refuses_a_checkpoint_that_would_run_code(tmp_path, small_corpus):
    marker = tmp_path / "marker"
    run = write_hostile_run(tmp_path / "run", marker)

    result = run_tool("vlm-eval", "zeroshot", "--checkpoint", str(run), "--data", str(small_corpus / "eval"),
                      "--no-progress")

    assert_refused_without_running_code(result, marker, "vlm-eval")


def test_vlm_curate_embed_refuses_a_checkpoint_that_would_run_code(tmp_path, small_corpus):
    marker = tmp_path / "marker"
    run = write_hostile_run(tmp_path / "run", marker)

    result = run_tool("vlm-curate", "embed", str(small_corpus / "train"), str(tmp_path / "emb"),
                      "--checkpoint", str(run), "--no-ray")

    assert_refused_without_running_code(result, marker, "vlm-curate")


def test_the_bootstrap_scorer_refuses_a_checkpoint_that_would_run_code(tmp_path, small_corpus):
    pool = tmp_path / "pool"
    curated = run_tool("vlm-curate", "run", *curate_config_args(webdataset_source(small_corpus / "train"), pool),
                       "--no-ray")
    assert curated.returncode == 0, curated.stderr
    boot, marker = tmp_path / "boot", tmp_path / "marker"
    write_hostile_run(boot / "round-00" / "run", marker)  # round 1 scores the pool with round 0's model
    (boot / "round-00" / "round.json").write_text(json.dumps(
        {"round": 0, "scorer": None, "rule": None, "cutoff": None, "pool_rows": 1, "kept": 1, "zero_shot": {}}))

    result = run_tool("vlm-curate", "bootstrap", str(REPO / "configs" / "curate" / "bootstrap_demo.yaml"),
                      "--rounds", "2", "--no-ray", f"pool={pool}", f"output_dir={boot}", "eval_sets=[]",
                      "ground_truth=", "embed.progress=false", "nproc=1",
                      'train_overrides=["steps=1", "optim.warmup_steps=0", "progress=false",'
                      ' "metrics.tensorboard=false"]')

    assert_refused_without_running_code(result, marker, "vlm-curate")
