"""A run killed with SIGKILL while it writes a checkpoint resumes from `latest` exactly: the same
per-step losses after the resume point, the same final weights, the same samples trained on.

The kill lands at each point of the save sequence: while DeepSpeed writes into the staging area
(timed by polling), and, through the fault-injection points of vlmtrain/failpoints.py, between the
rename into place and the `latest` update, during `latest`'s update, and during pruning (under
ZeRO-3). Random per-step computation (patch dropout, drop-path): test_model_randomness_resume.py."""
import collections
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_tool
from tests.helpers import (assert_same_weights, exported_weights, keys_per_step, kill_at_failpoint,
                           kill_while_writing, losses)

pytestmark = pytest.mark.dist

STEPS, EVERY = 16, 4


def train_command(corpus: Path, out_dir: Path, *extra: str) -> list[str]:
    return [str(Path(sys.executable).parent / "vlm-train"), "--config", "configs/train/demo.yaml",
            "--nproc-per-node", "2", f"data.train_shards={corpus / 'train'}", f"output_dir={out_dir}",
            f"steps={STEPS}", f"checkpoint.every={EVERY}", "checkpoint.keep=2", "data.record_keys=true",
            "data.workers=2", "data.batch_size=8", "data.shuffle_buffer=32", "log_every=1",
            "optim.warmup_steps=2", "metrics.tensorboard=false", "progress=false", *extra]


def uninterrupted(corpus: Path, out_dir: Path, *extra: str) -> Path:
    result = run_tool(*train_command(corpus, out_dir, *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir


@pytest.fixture(scope="module")
def straight(small_corpus, tmp_path_factory):
    """The reference every kill point is compared with (one run for the whole module)."""
    return uninterrupted(small_corpus, tmp_path_factory.mktemp("uninterrupted"))


@pytest.fixture(scope="module")
def straight_zero3(small_corpus, tmp_path_factory):
    return uninterrupted(small_corpus, tmp_path_factory.mktemp("uninterrupted_zero3"), "zero_stage=3")


@pytest.fixture(scope="module")
def runs(small_corpus, straight, tmp_path_factory):
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


# A kill at a fault-injection point of step 12's save (zero_stage=2 unless extra says) -> what `latest` names after it
KILL_POINTS = [
    pytest.param("renamed@step_0000012", (), "step_0000008", id="renamed"),  # in place, `latest` not updated
    pytest.param("publishing@step_0000012", (), "step_0000008", id="publishing"),  # new `latest` beside the old
    pytest.param("pruning@step_0000012", ("zero_stage=3",), "step_0000012", id="pruning-zero3"),  # step 4 removed
]


@pytest.mark.parametrize(("failpoint", "extra", "expected_latest"), KILL_POINTS)
def test_a_kill_at_each_later_point_of_the_save_resumes_exactly(failpoint, extra, expected_latest, small_corpus,
                                                                 request, tmp_path):
    reference = request.getfixturevalue("straight_zero3" if "zero_stage=3" in extra else "straight")
    run = tmp_path / "run"
    kill_at_failpoint(train_command(small_corpus, run, *extra), failpoint)
    checkpoints = run / "checkpoints"
    latest = (checkpoints / "latest").read_text()
    assert latest == expected_latest
    assert (checkpoints / latest / "vlmtrain_state.json").is_file()  # `latest` names a complete checkpoint
    if failpoint.startswith("pruning"):
        assert not (checkpoints / "step_0000004").exists() and (checkpoints / "step_0000008").is_dir()

    result = run_tool(*train_command(small_corpus, run, *extra, "resume=latest"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {int(latest.removeprefix('step_'))}" in result.stdout
    straight, resumed = losses(reference), losses(run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), f"step {step}"
    assert_same_weights(exported_weights(run), exported_weights(reference), atol=1e-6)
    assert keys_per_step(run) == keys_per_step(reference)
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_0000012", "step_0000016"]
