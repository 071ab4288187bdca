"""A run killed with SIGKILL at any point of a checkpoint save resumes from `latest` exactly: the same
per-step losses, the same final weights, the same samples trained on as a run never killed.

One run directory is killed four times in a row, each time at another point of the save sequence,
and resumed after each kill: while DeepSpeed writes into the staging area (timed by polling), and,
through the fault-injection points of vlmtrain/failpoints.py, between the rename into place and the
`latest` update, while an old checkpoint is being pruned, and while `latest` itself is replaced.
Every resume starts from what the previous kill left, so a kill that corrupted anything shows up at
the end. ZeRO-3, whose checkpoints are sharded over the ranks; ZeRO-2 and tensor- and
pipeline-parallel resumes are tested beside their layouts. (Random per-step computation, patch dropout
and drop-path: test_model_randomness_resume.py.)"""
import collections
import sys
from pathlib import Path

import pytest

from tests.conftest import failure_text, run_tool
from tests.helpers import (assert_same_weights, exported_weights, keys_per_step, kill_at_failpoint,
                           kill_while_writing, losses)

pytestmark = pytest.mark.dist

STEPS, EVERY = 16, 4

# Each kill in the chain: (how, where), what `latest` names after it, and the checkpoints in place.
KILLS = [
    (("while writing", "step_0000008"), "step_0000004", [4]),  # step 8 still in the staging area
    (("renamed", "step_0000008"), "step_0000004", [4, 8]),  # step 8 in place, `latest` not updated yet
    (("pruning", "step_0000012"), "step_0000012", [8, 12]),  # published, step 4 removed, then the kill
    (("publishing", "step_0000016"), "step_0000012", [8, 12, 16]),  # the new `latest` beside the old
]


def train_command(corpus: Path, out_dir: Path, *extra: str) -> list[str]:
    return [str(Path(sys.executable).parent / "vlm-train"), "--config", "configs/train/demo.yaml",
            "--nproc-per-node", "2", f"data.train_shards={corpus / 'train'}", f"output_dir={out_dir}",
            f"steps={STEPS}", f"checkpoint.every={EVERY}", "checkpoint.keep=2", "data.record_keys=true",
            "data.workers=2", "data.batch_size=8", "data.shuffle_buffer=32", "log_every=1", "zero_stage=3",
            "optim.warmup_steps=2", "metrics.tensorboard=false", "progress=false", *extra]


@pytest.fixture(scope="module")
def straight(small_corpus, tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run_tool(*train_command(small_corpus, out_dir))
    assert result.returncode == 0, failure_text(result)
    return out_dir


@pytest.fixture(scope="module")
def chain(small_corpus, tmp_path_factory) -> dict:
    """The run killed at each point of ``KILLS`` in turn, resumed after each, then finished."""
    run = tmp_path_factory.mktemp("killed_four_times")
    checkpoints = run / "checkpoints"
    after_kills, resume_logs = [], []
    for index, ((how, tag), _, _) in enumerate(KILLS):
        extra = ("resume=latest",) if index else ()
        if how == "while writing":
            landed = kill_while_writing(train_command(small_corpus, run, *extra), checkpoints, tag)
            assert landed, "the kill landed after the checkpoint was published"
        else:
            resume_logs.append(kill_at_failpoint(train_command(small_corpus, run, *extra), f"{how}@{tag}").stdout)
        latest = (checkpoints / "latest").read_text()
        after_kills.append({"latest": latest, "complete": (checkpoints / latest / "vlmtrain_state.json").is_file(),
                            "checkpoints": sorted(p.name for p in checkpoints.glob("step_*"))})
    finished = run_tool(*train_command(small_corpus, run, "resume=latest"))
    assert finished.returncode == 0, failure_text(finished)
    return {"dir": run, "after_kills": after_kills, "resume_logs": [*resume_logs, finished.stdout]}


@pytest.mark.parametrize("index", range(len(KILLS)), ids=[f"{how}@{tag}" for (how, tag), _, _ in KILLS])
def test_each_kill_leaves_latest_naming_a_complete_checkpoint(chain, index):
    _, latest, in_place = KILLS[index]
    state = chain["after_kills"][index]
    assert state["latest"] == latest
    assert state["checkpoints"] == [f"step_{step:07d}" for step in in_place]
    assert state["complete"]


def test_each_resume_starts_where_the_previous_kill_left_latest(chain):
    for log, (_, latest, _) in zip(chain["resume_logs"], KILLS):
        assert "resumed from" in log and f"at step {int(latest.removeprefix('step_'))}" in log


def test_losses_equal_the_uninterrupted_run(chain, straight):
    expected, resumed = losses(straight), losses(chain["dir"])
    assert sorted(resumed) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), f"step {step}"


def test_final_weights_equal_the_uninterrupted_run(chain, straight):
    assert_same_weights(exported_weights(chain["dir"]), exported_weights(straight), atol=1e-6)


def test_every_sample_is_trained_on_exactly_as_without_the_kills(chain, straight):
    resumed = keys_per_step(chain["dir"])
    assert resumed == keys_per_step(straight)  # same keys at the same step on the same rank
    multiset = collections.Counter(k for keys in resumed.values() for k in keys)
    assert sum(multiset.values()) == 2 * STEPS * 8


def test_only_the_newest_checkpoints_are_kept(chain):
    checkpoints = chain["dir"] / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_0000012", "step_0000016"]
    assert (checkpoints / "latest").read_text() == "step_0000016"
