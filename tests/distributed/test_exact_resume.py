"""A run killed with SIGKILL while it writes a checkpoint resumes from `latest` exactly: the same
per-step losses after the resume point, the same final weights, the same samples trained on."""
import collections
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_tool
from tests.distributed.training_runs import kill_while_writing

pytestmark = pytest.mark.dist

STEPS, EVERY = 16, 4


def train_command(corpus: Path, out_dir: Path, *extra: str) -> list[str]:
    return [str(Path(sys.executable).parent / "vlm-train"), "--config", "configs/train/demo.yaml",
            "--nproc-per-node", "2", f"data.train_shards={corpus / 'train'}", f"output_dir={out_dir}",
            f"steps={STEPS}", f"checkpoint.every={EVERY}", "checkpoint.keep=2", "data.record_keys=true",
            "data.workers=2", "data.batch_size=8", "data.shuffle_buffer=32", "log_every=1",
            "optim.warmup_steps=2", "metrics.tensorboard=false", "progress=false", *extra]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def keys_per_step(run_dir: Path) -> dict[tuple[int, int], list[str]]:
    steps = {}
    for rank in (0, 1):
        for line in (run_dir / "sample_keys" / f"rank{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            assert (rank, record["step"]) not in steps, f"step {record['step']} logged twice"
            steps[rank, record["step"]] = record["keys"]
    return steps


@pytest.fixture(scope="module")
def runs(small_corpus, tmp_path_factory):
    straight = tmp_path_factory.mktemp("uninterrupted")
    result = run_tool(*train_command(small_corpus, straight))
    assert result.returncode == 0, result.stderr[-3000:]

    resumed = tmp_path_factory.mktemp("killed_then_resumed")
    checkpoints = resumed / "checkpoints"
    killed_mid_write = kill_while_writing(train_command(small_corpus, resumed), checkpoints, "step_0000012")
    latest_after_kill = (checkpoints / "latest").read_text()
    result = run_tool(*train_command(small_corpus, resumed, "resume=latest"))
    assert result.returncode == 0, result.stderr[-3000:]
    return {"straight": straight, "resumed": resumed, "killed_mid_write": killed_mid_write,
            "latest_after_kill": latest_after_kill, "resume_log": result.stdout}


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_latest(runs):
    assert runs["killed_mid_write"], "the kill landed after the checkpoint was published"
    assert runs["latest_after_kill"] == "step_0000008"
    assert "resumed from" in runs["resume_log"] and "at step 8" in runs["resume_log"]


def test_losses_after_the_resume_point_equal_the_uninterrupted_run(runs):
    straight, resumed = losses(runs["straight"]), losses(runs["resumed"])
    assert sorted(resumed) == sorted(straight) == list(range(1, STEPS + 1))
    for step in range(9, STEPS + 1):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), f"step {step}"


def test_final_weights_equal_the_uninterrupted_run(runs):
    straight = load_file(runs["straight"] / "final" / "model.safetensors")
    resumed = load_file(runs["resumed"] / "final" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=1e-6, rtol=0, msg=name)


def test_every_sample_is_trained_on_exactly_as_without_the_kill(runs):
    straight, resumed = keys_per_step(runs["straight"]), keys_per_step(runs["resumed"])
    assert resumed == straight  # same keys at the same step on the same rank
    multiset = collections.Counter(k for keys in resumed.values() for k in keys)
    assert sum(multiset.values()) == 2 * STEPS * 8


def test_only_the_newest_checkpoints_are_kept(runs):
    checkpoints = runs["resumed"] / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_0000012", "step_0000016"]
    assert (checkpoints / "latest").read_text() == "step_0000016"
